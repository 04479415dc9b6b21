"""train.py's low-cost validation (--dev_every, --dev_records, --patience, --min_delta), through
``python train.py`` on the lab fixture's tiny base.

The dev split is crafted so that its score is known without the code under test (the ``crafted``
fixture of tests/conftest.py): of the first 8 held-out records, 3 get as their expected output the base
model's own greedy answer, the others keep their real answers, which the barely trained base cannot
give. With --lr 0 the model never moves, so every dev evaluation must score exactly 3/8, and a record
after the first --dev_records that is also made answerable must not count.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

import llama_min.training.robust
from llama_min.checkpoint import load_checkpoint
from llama_min.finetune.exact_match import exact_match_accuracy
from llama_min.training.data import DEV_ANSWER_TOKENS
from conftest import DEV_RECORDS, EXPECTED_ACCURACY
from scripts import Run, metrics, run_script

def finetune(crafted, out_dir, *extra, steps=10, lr="1e-2") -> Run:
    # --decay_steps fixed: the learning rate of a step must not depend on --max_steps (runs of different
    # lengths are compared step for step); --eval_every past the end: the held-out loss only at the end.
    return run_script("train.py", "--init_from", crafted["base_dir"], "--data", crafted["path"],
                      "--val_fraction", "0.3333", "--seq_len", "160", "--batch_size", "4", "--lr", lr,
                      "--warmup_steps", "1", "--decay_steps", "100", "--max_steps", steps, "--log_every", "1",
                      "--eval_every", "100", "--sample_tokens", "0", "--peak_flops", "1e12", "--out_dir", out_dir, *extra)


def last_step(out_dir) -> int:
    return metrics(out_dir)[-1]["step"]


def summary(out_dir) -> dict:
    return json.loads((out_dir / "early_stopping.json").read_text())


def dev_flags(every=1, patience=2):
    return ["--dev_every", str(every), "--patience", str(patience), "--dev_records", str(DEV_RECORDS)]


@pytest.fixture(scope="module")
def frozen_run(crafted, tmp_path_factory):
    """--lr 0: the dev score cannot improve after the first evaluation, so the run must stop after
    1 + patience evaluations, at step 3 of 10."""
    out = tmp_path_factory.mktemp("frozen")
    return out, finetune(crafted, out, *dev_flags(), lr="0")


def test_a_run_that_cannot_improve_stops_after_patience_evaluations(crafted, frozen_run):
    out, run = frozen_run
    assert run.code == 0 and last_step(out) == 3, \
        f"dev_every 1, patience 2, no improvement possible: expected to stop at step 3, got {last_step(out)}"
    saved = summary(out)
    want = {"chosen_step": 1, "best_metric": EXPECTED_ACCURACY, "stopped_at": 3, "total_steps": 10,
            "steps_saved": 7, "compute_saved": 0.7, "best_checkpoint": str(out / "best")}
    assert saved == want, f"early_stopping.json: {saved}, expected {want}"
    assert "early stopping: chose step 1" in run.out and "70% of the planned steps saved" in run.out, run.out
    assert (out / "ckpt" / "train_state.pt").is_file(), "an early stop must leave a resumable final checkpoint"
    base, best = load_file(crafted["base_dir"] / "model.safetensors"), load_file(out / "best" / "model.safetensors")
    assert base.keys() == best.keys() and all(torch.equal(base[k], best[k]) for k in base), \
        "with --lr 0 the best model (step 1) must be exactly the base"


def test_recorded_dev_accuracy_is_the_best_models_exact_match(crafted, frozen_run):
    out, _ = frozen_run
    recorded = [(m["step"], m["dev_accuracy"]) for m in metrics(out) if m["dev_accuracy"] is not None]
    assert [s for s, _ in recorded] == [1, 2, 3], f"one dev evaluation per step until the stop, got {recorded}"
    dev = crafted["held_out"][:DEV_RECORDS]
    again = exact_match_accuracy(load_checkpoint(out / "best"), crafted["tokenizer"], dev, DEV_ANSWER_TOKENS)
    assert again == EXPECTED_ACCURACY, f"the best model answers {again} of the crafted dev records, expected 3/8"
    assert all(a == again for _, a in recorded), \
        f"metrics.jsonl dev_accuracy {recorded} must equal the recomputed {again} " \
        f"(on the first {DEV_RECORDS} held-out records)"


def script_dev_scores(monkeypatch, scores):
    """Make train.py's dev evaluations report ``scores`` in turn; the real scoring still runs (its cost and
    its effect on the model's state stay as they are)."""
    scores, real = iter(scores), llama_min.training.robust.exact_match_accuracy

    def scripted(*args, **kwargs):
        real(*args, **kwargs)
        return next(scores)

    monkeypatch.setattr(llama_min.training.robust, "exact_match_accuracy", scripted)


def test_best_checkpoint_is_the_model_at_the_chosen_step(crafted, tmp_path, monkeypatch):
    """Real learning, a scripted dev score (the real scoring still runs): 0.1, 0.5, 0.3, 0.5 picks step 2
    (a tie is no improvement) and stops at 4. best/ must equal a run of the same seed stopped at step 2."""
    script_dev_scores(monkeypatch, [0.1, 0.5, 0.3, 0.5])
    finetune(crafted, tmp_path / "early", *dev_flags())
    monkeypatch.undo()
    chosen = summary(tmp_path / "early")
    assert (chosen["chosen_step"], chosen["stopped_at"], chosen["best_metric"]) == (2, 4, 0.5), chosen
    finetune(crafted, tmp_path / "two", steps=2)
    best = load_file(tmp_path / "early" / "best" / "model.safetensors")
    at_two = load_file(tmp_path / "two" / "ckpt" / "model.safetensors")
    base = load_file(crafted["base_dir"] / "model.safetensors")
    assert any(not torch.equal(base[k], at_two[k]) for k in base), "premise: two steps at --lr 1e-2 move the weights"
    differ = sorted(k for k in at_two if not torch.equal(best[k], at_two[k]))
    assert not differ, f"best/ is not the model after step 2 (the chosen step): {differ} differ"


def test_merge_folds_the_best_lora_not_the_last(crafted, tmp_path, monkeypatch):
    """--method lora --merge --dev_every: OUT_DIR/merged is the chosen (best) adapter folded into the base,
    computed here independently: W + (alpha / r)·B·A from best/'s own tensors."""
    from llama_min.peft import read_peft_meta

    script_dev_scores(monkeypatch, [0.5, 0.1, 0.1])
    finetune(crafted, tmp_path / "run", "--method", "lora", "--merge", *dev_flags(patience=0), steps=3)
    monkeypatch.undo()
    best, last = (load_file(tmp_path / "run" / d / "peft.safetensors") for d in ("best", "peft"))
    assert any(not torch.equal(best[k], last[k]) for k in best), "premise: the adapter moved after the chosen step 1"
    config = read_peft_meta(tmp_path / "run" / "best")["config"]
    scale = config["lora_alpha"] / config["lora_rank"]
    base = load_file(crafted["base_dir"] / "model.safetensors")
    merged = load_file(tmp_path / "run" / "merged" / "model.safetensors")
    for key, w in base.items():
        prefix = key.removesuffix("weight")
        want = w + scale * best[prefix + "lora_b"] @ best[prefix + "lora_a"] if prefix + "lora_a" in best else w
        torch.testing.assert_close(merged[key], want, msg=f"{key}: merged/ is not the best adapter folded into the base")


def test_resume_keeps_the_early_stopping_state(crafted, frozen_run, tmp_path):
    straight, _ = frozen_run
    finetune(crafted, tmp_path / "run", *dev_flags(), lr="0", steps=2)  # best at 1, then 1 of 2 without improvement
    assert run_script("train.py", "--resume", "--out_dir", tmp_path / "run", "--max_steps", "10").code == 0
    assert last_step(tmp_path / "run") == last_step(straight) == 3, \
        f"resumed run stopped at {last_step(tmp_path / 'run')}, the uninterrupted one at 3: the state was lost"
    assert summary(tmp_path / "run")["chosen_step"] == 1, summary(tmp_path / "run")


@pytest.mark.parametrize("argv, message", [
    (["--dev_every", "-1"], "--dev_every -1"),
    (["--dev_every", "2", "--patience", "-2"], "--patience -2"),
    (["--dev_every", "2", "--min_delta", "-0.1"], "--min_delta -0.1"),
    (["--patience", "3"], "add --dev_every"),
    (["--min_delta", "0.1"], "add --dev_every"),
    (["--dev_every", "2", "--dev_records", "0"], "--dev_records 0"),
])
def test_bad_flags_are_one_line_errors(crafted, tmp_path, argv, message):
    run = finetune(crafted, tmp_path / "run", *argv)
    err = run.err
    assert run.code == 1 and message in err and err.count("\n") == 1, f"expected a one-line error containing {message!r}, got {err!r}"


def test_dev_every_on_plain_text_is_a_one_line_error(word_bench, tmp_path):
    run = run_script("train.py", "--init_from", word_bench / "base" / "ckpt", "--data", word_bench / "benchmark" / "pretrain",
                     "--cache_dir", tmp_path / "cache", "--seq_len", "48", "--dev_every", "2",
                     "--out_dir", tmp_path / "run")
    err = run.err
    assert "plain text" in err and "instruction data" in err and "--eval_every" in err and err.count("\n") == 1, \
        f"expected a one-line error pointing to instruction data or --eval_every, got {err!r}"
