"""lab.leaderboard: entries ranked by held-out bits per byte (fewer steps first on a tie), an entry made from
a train.py run's metrics.jsonl, and a one-line error naming the file and the field for every bad entry."""

import json

import pytest
import torch

from lab.leaderboard import entry_from_run, main, rank


def entry(tmp_path, name, **fields):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"name": name, "val_bpb": 2.5, "step": 200, "elapsed_s": 100.0, **fields}))
    return path


def test_lowest_bits_per_byte_first_then_fewest_steps(tmp_path, capsys):
    files = [entry(tmp_path, "c", val_bpb=2.9), entry(tmp_path, "a", val_bpb=2.6, step=400),
             entry(tmp_path, "b", val_bpb=2.6, step=100), entry(tmp_path, "d", val_bpb=2.55, command="python train.py")]
    assert [e["name"] for e in rank(files)] == ["d", "b", "a", "c"]
    main([str(f) for f in files])
    rows = capsys.readouterr().out.splitlines()
    assert [row.split()[:2] for row in rows[1:]] == [["1", "d"], ["2", "b"], ["3", "a"], ["4", "c"]]
    assert "2.5500" in rows[1]


def test_an_entry_from_a_run_takes_its_last_held_out_figure(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": 50, "train_loss": 6.0, "val_loss": 5.6, "val_bpb": 2.97, "elapsed_s": 40.0},
             {"step": 60, "train_loss": 5.9, "val_loss": None, "val_bpb": None, "elapsed_s": 45.0},
             {"step": 100, "train_loss": 5.2, "val_loss": 5.1, "val_bpb": 2.7417123, "elapsed_s": 80.04}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert entry_from_run(run, "Ada") == {"name": "Ada", "val_bpb": 2.741712, "step": 100, "elapsed_s": 80.0}
    (run / "ckpt").mkdir()
    torch.save({"step": 100, "train_config": {"eval_tokens": 16384}}, run / "ckpt" / "train_state.pt")
    assert entry_from_run(run, "Ada")["eval_tokens"] == 16384
    main(["--entry", str(run), "--name", " Ada ", "--out", str(tmp_path / "ada.json")])
    assert rank([tmp_path / "ada.json"])[0]["name"] == "Ada"
    (run / "metrics.jsonl").write_text(json.dumps(lines[1]) + "\n")
    with pytest.raises(SystemExit, match="holds no held-out bits per byte"):
        main(["--entry", str(run), "--name", "Ada"])
    with pytest.raises(SystemExit, match="--entry needs --name"):
        main(["--entry", str(run)])


@pytest.mark.parametrize("text, says", [
    ("{not json", "not a readable JSON file"),
    ("[1, 2]", "expected one JSON object"),
    ('{"name": "x", "val_bpb": 2.5, "step": 10}', "missing field 'elapsed_s'"),
    ('{"name": "x", "val_bpb": -1, "step": 10, "elapsed_s": 1}', "val_bpb is -1; expected a number > 0"),
    ('{"name": "x", "val_bpb": "2.5", "step": 10, "elapsed_s": 1}', "val_bpb is \"2.5\"; expected a number > 0"),
    ('{"name": "x", "val_bpb": true, "step": 10, "elapsed_s": 1}', "val_bpb is true"),
    ('{"name": "x", "val_bpb": 2.5, "step": 0, "elapsed_s": 1}', "step is 0; expected an integer >= 1"),
    ('{"name": "x", "val_bpb": 2.5, "step": 1.5, "elapsed_s": 1}', "step is 1.5; expected an integer >= 1"),
    ('{"name": " ", "val_bpb": 2.5, "step": 1, "elapsed_s": 1}', "name is \" \"; expected non-empty text"),
    ('{"name": "x", "val_bpb": 2.5, "step": 1, "elapsed_s": 1, "loss": 3}', "unknown fields ['loss']"),
    ('{"name": "x", "val_bpb": 2.5, "step": 1, "elapsed_s": 1, "eval_tokens": "all"}', "eval_tokens is \"all\""),
])
def test_a_bad_entry_is_a_one_line_error_naming_the_file(tmp_path, text, says):
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    with pytest.raises(SystemExit) as stop:
        main([str(entry(tmp_path, "good")), str(bad)])
    message = str(stop.value)
    assert message.startswith(f"lab.leaderboard: error: {bad}: ") and says in message and "\n" not in message


def test_one_entry_per_name_and_some_files_needed(tmp_path):
    first, second = entry(tmp_path, "a"), tmp_path / "again.json"
    second.write_text(first.read_text())
    with pytest.raises(SystemExit, match="name 'a' is already on the board"):
        main([str(first), str(second)])
    with pytest.raises(SystemExit, match="give the entry files to rank"):
        main([])
    with pytest.raises(SystemExit, match="not a readable JSON file"):
        main([str(tmp_path / "missing.json")])
