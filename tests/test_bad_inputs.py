"""Bad inputs and faults, as a careful user meets them, against the three scripts and the library.

Each case is one row: what is done, the one line it must print (fragments of it), and then the proof
that nothing was lost: every file of the runs and checkpoints that already existed is byte for byte
what it was. A row's message must name the file (or flag) at fault and say what to do.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from llama_min.checkpoint import save_checkpoint

from conftest import random_model, tiny_config
from scripts import metrics, run_script, shakespeare_slice

TINY = ["--dim", "32", "--n_layers", "2", "--n_heads", "2", "--n_kv_heads", "1", "--multiple_of", "16"]


def finetune_args(world, out, *extra):
    """train.py on the world's corpus, 4 steps, a checkpoint every 2; the model from --init_from."""
    return ["--data", world / "data", "--cache_dir", world / "cache", "--out_dir", out, "--seq_len", "32",
            "--batch_size", "4", "--max_steps", "4", "--warmup_steps", "1", "--log_every", "1", "--eval_every", "2",
            "--eval_tokens", "1024", "--sample_tokens", "0", *extra]


def run_args(world, out, *extra):
    """The same, pretraining a tiny model from scratch."""
    return [*TINY, "--vocab_size", "384", *finetune_args(world, out, *extra)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A slice of the shipped corpus, a finished 4-step run (OUT_DIR/base, checkpoint at step 4)."""
    root = tmp_path_factory.mktemp("world")
    shakespeare_slice(root)
    done = run_script("train.py", *run_args(root, root / "base"))
    assert done.code == 0, done.err
    return root


def snapshot(*paths: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for path in paths if path.exists() for p in sorted(path.rglob("*")) if p.is_file()}


def copy_run(world, name: str) -> Path:
    shutil.copytree(world / "base", world / name, dirs_exist_ok=True)
    return world / name


@dataclass
class Case:
    name: str
    script: str
    argv: Callable  # (world, tmp_path) -> argv
    expect: tuple[str, ...]  # fragments of the one line on stderr
    prepare: Callable = lambda world, tmp_path: None  # noqa: E731  makes the bad input
    kept: Callable = lambda world, tmp_path: [world / "base"]  # noqa: E731  what must stay untouched
    extra: dict = field(default_factory=dict)


def damage_weights(path: Path, how: str) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2] if how == "truncated" else b"\x10\x00\x00\x00\x00\x00\x00\x00{bad header}")


def nan_checkpoint(world, tmp_path):
    model = random_model(tiny_config())
    with torch.no_grad():
        model.norm.weight[3] = float("nan")
    save_checkpoint(model, tmp_path / "nan", tokenizer_path=next((world / "base" / "ckpt").glob("tokenizer.model")))


def checkpoint_copy(world, tmp_path, damage=None):
    shutil.copytree(world / "base" / "ckpt", tmp_path / "copy")
    if damage:
        damage(tmp_path / "copy")


CASES = [
    # -- data and prompt files
    Case("non-UTF-8 training text", "train.py",
         lambda w, t: run_args(w, t / "run", "--data", t / "latin1.txt", "--tokenizer", w / "base/ckpt/tokenizer.model"),
         ("latin1.txt", "not UTF-8", "iconv"),
         prepare=lambda w, t: (t / "latin1.txt").write_bytes("café\n".encode("latin-1") * 500)),
    Case("non-UTF-8 prompt file", "generate.py",
         lambda w, t: ["--checkpoint", w / "base/ckpt", "--prompt_file", t / "p.txt"],
         ("--prompt_file", "p.txt", "not UTF-8"),
         prepare=lambda w, t: (t / "p.txt").write_bytes("naïve\n".encode("latin-1"))),
    # -- damaged checkpoints, every way in
    *[Case(f"{how} model.safetensors via {script}", script, argv, ("copy/model.safetensors", "again"),
           prepare=lambda w, t, how=how: checkpoint_copy(w, t, lambda d: damage_weights(d / "model.safetensors", how)))
      for how in ("truncated", "bad header")
      for script, argv in (("train.py", lambda w, t: finetune_args(w, t / "run", "--init_from", t / "copy")),
                           ("generate.py", lambda w, t: ["--checkpoint", t / "copy", "--prompt", "KING."]))],
    Case("config.json that is not JSON", "generate.py", lambda w, t: ["--checkpoint", t / "copy", "--prompt", "KING."],
         ("copy/config.json", "not a llama_min model config"),
         prepare=lambda w, t: checkpoint_copy(w, t, lambda d: (d / "config.json").write_text("{dim: 64"))),
    Case("garbage tokenizer.model", "generate.py", lambda w, t: ["--checkpoint", t / "copy", "--prompt", "KING."],
         ("copy/tokenizer.model", "not a sentencepiece tokenizer model"),
         prepare=lambda w, t: checkpoint_copy(w, t, lambda d: (d / "tokenizer.model").write_bytes(b"\x00garbage" * 64))),
    Case("non-finite weights via generate.py", "generate.py", lambda w, t: ["--checkpoint", t / "nan", "--prompt", "KING."],
         ("nan/model.safetensors", "tensor norm.weight", "NaN or infinite"), prepare=nan_checkpoint),
    Case("non-finite weights via --init_from", "train.py", lambda w, t: finetune_args(w, t / "run", "--init_from", t / "nan"),
         ("nan/model.safetensors", "tensor norm.weight", "NaN or infinite"), prepare=nan_checkpoint),
    Case("fine-tuning from a checkpoint without a tokenizer", "train.py",
         lambda w, t: finetune_args(w, t / "run", "--init_from", t / "copy"),
         ("holds no tokenizer.model or tokenizer.json", "--tokenizer"),
         prepare=lambda w, t: checkpoint_copy(w, t, lambda d: (d / "tokenizer.model").unlink())),
    # -- resuming
    *[Case(f"{how} train_state.pt", "train.py", lambda w, t, how=how: ["--resume", "--out_dir", w / f"state_{how}"],
           ("train_state.pt", "cannot be read", "damaged"),
           prepare=lambda w, t, how=how: damage_state(copy_run(w, f"state_{how}"), how),
           extra={"not_in_message": "weights_only"})
      for how in ("truncated", "random")],
    Case("optimiser state of another model", "train.py", lambda w, t: ["--resume", "--out_dir", w / "wrong_opt"],
         ("optimiser state", "does not fit this model", "another run"),
         prepare=lambda w, t: transpose_optimizer_state(copy_run(w, "wrong_opt"))),
    Case("explicit --vocab_size against --tokenizer", "train.py",
         lambda w, t: run_args(w, t / "run", "--tokenizer", w / "base/ckpt/tokenizer.model") + ["--vocab_size", "500"],
         ("--vocab_size 500", "has 384 tokens", "drop --vocab_size")),
    Case("a flag's prefix", "train.py", lambda w, t: ["--max_step", "5"], ("unrecognized arguments: --max_step",)),
    Case("sampling flags checked before loading", "generate.py",
         lambda w, t: ["--checkpoint", t / "nowhere", "--prompt", "KING.", "--top_k", "-3"], ("top_k must be",)),
    Case("an --out_dir that is a file", "train.py", lambda w, t: run_args(w, t / "file"),
         ("--out_dir", "cannot write there"), prepare=lambda w, t: (t / "file").write_text("mine")),
]


def damage_state(run: Path, how: str) -> None:
    path = run / "ckpt" / "train_state.pt"
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 3] if how == "truncated" else bytes(range(256)) * 8)


def transpose_optimizer_state(run: Path) -> None:
    path = run / "ckpt" / "train_state.pt"
    state = torch.load(path, weights_only=True)
    for s in state["optimizer"]["state"].values():
        if s["exp_avg"].dim() == 2:
            s["exp_avg"], s["exp_avg_sq"] = s["exp_avg"].t().contiguous(), s["exp_avg_sq"].t().contiguous()
    torch.save(state, path)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_clear_line_and_loses_nothing(world, tmp_path, case):
    case.prepare(world, tmp_path)
    kept = case.kept(world, tmp_path) + [p for p in tmp_path.iterdir()]
    before = snapshot(*kept)
    done = run_script(case.script, *case.argv(world, tmp_path))
    err = done.err.strip()
    assert done.code != 0, f"{case.name}: accepted\n{done.out[-1500:]}"
    assert "\n" not in err and "Traceback" not in err, f"{case.name}: expected one line, got:\n{err}"
    for fragment in case.expect:
        assert fragment in err, f"{case.name}: the message should mention {fragment!r}: {err}"
    assert case.extra.get("not_in_message", "\0") not in err, f"{case.name}: the message gives bad advice: {err}"
    assert snapshot(*kept) == before, f"{case.name}: an existing file was changed"


# ---- the wrong results of the sweep: each failed before its fix --------------------------------------


def test_a_diverged_run_keeps_its_last_finite_checkpoint_and_resumes_with_a_lower_lr(world, tmp_path):
    """--lr 1e3: the update of step 3 or 4 makes the weights useless and the held-out loss NaN at step 4.
    Nothing non-finite is saved, the message names the step the kept checkpoint holds, and a resume
    with a sane rate continues from it."""
    out = tmp_path / "run"
    done = run_script("train.py", *run_args(world, out, "--lr", "1e3", "--max_steps", "12"))
    assert done.code == 1 and "not saved" in done.err and "holds step 2" in done.err, done.err
    state = torch.load(out / "ckpt" / "train_state.pt", weights_only=True)
    weights = load_file(out / "ckpt" / "model.safetensors")
    assert state["step"] == 2 and all(torch.isfinite(w).all() for w in weights.values())
    assert all(r["val_loss"] is None or r["val_loss"] == r["val_loss"] for r in metrics(out)), "NaN in metrics.jsonl"
    resumed = run_script("train.py", "--resume", "--out_dir", out, "--lr", "1e-3")
    assert resumed.code == 0, resumed.err
    assert metrics(out)[-1]["step"] == 12


def test_divergence_before_any_checkpoint_says_there_is_none(world, tmp_path):
    done = run_script("train.py", *run_args(world, tmp_path / "run", "--lr", "1e3", "--eval_every", "50",
                                             "--max_steps", "50"))
    assert done.code == 1 and "No checkpoint was saved" in done.err, done.err
    assert not (tmp_path / "run" / "ckpt").exists()


def test_nan_metrics_are_written_as_null(world, tmp_path):
    """metrics.jsonl must stay JSON: the step-4 held-out loss of the diverged run above is NaN."""
    run_script("train.py", *run_args(world, tmp_path / "run", "--lr", "1e3", "--max_steps", "4"))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl")) for line in lines]
    assert any(r["step"] == 4 and r["val_loss"] is None for r in records), records


def test_an_adapter_on_another_base_of_the_same_shape_is_refused(lab, tmp_path):
    """The adapter records its base's fingerprint: a different base of the same config is refused,
    naming the recorded base, unless asked to allow it."""
    base = lab / "base" / "ckpt"
    run = run_script("train.py", "--init_from", base, "--method", "lora", "--data", lab / "lab/instructions/train.jsonl",
                     "--seq_len", "160", "--batch_size", "4", "--max_steps", "2", "--eval_every", "2",
                     "--sample_tokens", "0", "--out_dir", tmp_path / "lora")
    assert run.code == 0, run.err
    other = random_model(load_file_config(base))
    save_checkpoint(other, tmp_path / "other", tokenizer_path=base / "tokenizer.model")
    done = run_script("generate.py", "--checkpoint", tmp_path / "other", "--peft", tmp_path / "lora" / "peft",
                      "--prompt", "hi", "--max_new_tokens", "2")
    assert done.code == 1 and "another base model" in done.err and str(base.resolve()) in done.err, done.err
    allowed = run_script("generate.py", "--checkpoint", tmp_path / "other", "--peft", tmp_path / "lora" / "peft",
                         "--prompt", "hi", "--max_new_tokens", "2", "--allow_other_base")
    assert allowed.code == 0, allowed.err
    same = run_script("generate.py", "--checkpoint", base, "--peft", tmp_path / "lora" / "peft", "--prompt", "hi",
                      "--max_new_tokens", "2", "--dtype", "bfloat16")
    assert same.code == 0, f"its own base in bfloat16 must still match: {same.err}"


def load_file_config(checkpoint: Path):
    from llama_min.config import ModelConfig
    return ModelConfig.load(checkpoint / "config.json")


# ---- unclear before, now continuing or one line ---------------------------------------------------------


def test_resume_of_a_lora_run_finds_it_without_method(lab, tmp_path):
    args = ["--init_from", lab / "base" / "ckpt", "--data", lab / "lab/instructions/train.jsonl", "--seq_len", "160",
            "--batch_size", "4", "--eval_every", "2", "--sample_tokens", "0", "--out_dir", tmp_path / "run"]
    assert run_script("train.py", *args, "--method", "lora", "--max_steps", "2").code == 0
    resumed = run_script("train.py", "--resume", "--out_dir", tmp_path / "run", "--max_steps", "4")
    assert resumed.code == 0, resumed.err
    assert metrics(tmp_path / "run")[-1]["step"] == 4


def test_a_half_written_metrics_line_does_not_stop_a_resume(world, tmp_path):
    out = copy_run(world, "half_line")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train_los')  # killed mid-write
    resumed = run_script("train.py", "--resume", "--out_dir", out, "--max_steps", "6")
    assert resumed.code == 0, resumed.err
    assert [r["step"] for r in metrics(out)][-1] == 6


def test_disk_full_while_saving_keeps_the_previous_checkpoint(world, tmp_path, monkeypatch):
    out = copy_run(world, "full_disk")
    before = snapshot(out / "ckpt")

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    done = run_script("train.py", "--resume", "--out_dir", out, "--max_steps", "6")
    assert done.code == 1 and "No space left on device" in done.err and "untouched" in done.err, done.err
    assert "\n" not in done.err.strip()
    assert snapshot(out / "ckpt") == before, "the previous checkpoint changed"


def test_a_legacy_pth_shard_converts(tmp_path):
    """A Meta shard in torch's pre-1.6 (non-zip) format cannot be memory-mapped; it is read whole."""
    from convert_helpers import write_meta

    model = random_model(tiny_config(vocab_size=96))
    write_meta(model, tmp_path / "meta", 1, vocab_in_params=True)
    shard = tmp_path / "meta" / "consolidated.00.pth"
    torch.save(torch.load(shard, weights_only=True), shard, _use_new_zipfile_serialization=False)
    done = run_script("weights_convert.py", tmp_path / "meta", tmp_path / "out")
    assert done.code == 0, done.err
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items()), "the legacy shard's tensors changed"
