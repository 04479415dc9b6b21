"""Bad inputs and faults, as a careful user meets them, against the three scripts and the library.

Each case is one row: what is done, the one line it must print (fragments of it), and then the proof
that nothing was lost: every file of the runs and checkpoints that already existed is byte for byte
what it was. A row's message must name the file (or flag) at fault and say what to do.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from llama_min.checkpoint import save_checkpoint

from conftest import interruptible, random_model, tiny_config
from scripts import ROOT, metrics, run_script, shakespeare_slice

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
    lora = run_script("train.py", *finetune_args(root, root / "lora", "--init_from", root / "base/ckpt", "--method",
                                                 "lora", "--max_steps", "2"))
    assert lora.code == 0, lora.err
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
         lambda w, t: ["--checkpoint", t / "nowhere", "--prompt", "KING.", "--top_k", "-3"],
         ("--top_k -3", "0 for no limit"), extra={"not_in_message": "None"}),
    Case("a NaN temperature", "generate.py",
         lambda w, t: ["--checkpoint", w / "base/ckpt", "--prompt", "KING.", "--temperature", "nan"],
         ("--temperature", "finite")),
    # -- model sizes that cannot be (each field is checked, named with the flag or the file it came from)
    *[Case(f"--{name} {value}", "train.py", lambda w, t, name=name, value=value: run_args(w, t / "run", f"--{name}", value),
           (f"--{name} {value}", f"{name} must be at least 1", "change that flag"))
      for name, value in (("dim", "0"), ("n_layers", "0"), ("n_heads", "0"), ("n_layers", "-1"))],
    Case("config.json with a size of the wrong type", "generate.py",
         lambda w, t: ["--checkpoint", t / "copy", "--prompt", "KING."], ("copy/config.json", "dim must be an integer"),
         prepare=lambda w, t: checkpoint_copy(w, t, lambda d: edit_json(d / "config.json", dim="32"))),
    Case("config.json with a megabyte in one value", "generate.py",
         lambda w, t: ["--checkpoint", t / "copy", "--prompt", "KING."], ("copy/config.json", "attn_impl", "…"),
         prepare=lambda w, t: checkpoint_copy(w, t, lambda d: edit_json(d / "config.json", attn_impl="x" * 1_300_000)),
         extra={"max_length": 400}),
    Case("Hugging Face config.json with 0 attention heads", "weights_convert.py", lambda w, t: [t / "hf", t / "back"],
         ("hf/config.json", "num_attention_heads must be a positive integer, got 0"),
         prepare=lambda w, t: hf_copy(w, t, num_attention_heads=0)),
    Case("Hugging Face config.json with a size as text", "weights_convert.py", lambda w, t: [t / "hf", t / "back"],
         ("hf/config.json", "hidden_size must be a positive integer, got '32'"),
         prepare=lambda w, t: hf_copy(w, t, hidden_size="32")),
    # -- adapters
    *[Case(f"peft.json {how}", "generate.py", lambda w, t: ["--checkpoint", w / "base/ckpt", "--peft", t / "lora",
                                                            "--prompt", "KING."], ("lora/peft.json", *expect),
           prepare=lambda w, t, content=content: peft_copy(w, t, lambda d: (d / "peft.json").write_text(content)))
      for how, content, expect in (("empty", "", ("not valid JSON", "copy it again")),
                                   ("a list", "[1, 2]", ("expected a JSON object",)))],
    Case("peft.json with a rank as text", "generate.py",
         lambda w, t: ["--checkpoint", w / "base/ckpt", "--peft", t / "lora", "--prompt", "KING."],
         ("lora/peft.json", "lora_rank must be an integer", "'8'"),
         prepare=lambda w, t: peft_copy(w, t, lambda d: edit_json(d / "peft.json", config={
             **json.loads((d / "peft.json").read_text())["config"], "lora_rank": "8"}))),
    Case("peft.json with a fingerprint of text", "generate.py",
         lambda w, t: ["--checkpoint", w / "base/ckpt", "--peft", t / "lora", "--prompt", "KING."],
         ("lora/peft.json", "base_fingerprint", "train the adapter again"),
         prepare=lambda w, t: peft_copy(w, t, lambda d: edit_json(d / "peft.json", base_fingerprint={"norm.weight": "x"}))),
    Case("truncated peft.safetensors", "generate.py",
         lambda w, t: ["--checkpoint", w / "base/ckpt", "--peft", t / "lora", "--prompt", "KING."],
         ("lora/peft.safetensors", "damaged", "again"),
         prepare=lambda w, t: peft_copy(w, t, lambda d: damage_weights(d / "peft.safetensors", "truncated"))),
    Case("--method given twice", "train.py",
         lambda w, t: finetune_args(w, t / "run", "--init_from", w / "base/ckpt", "--method", "lora", "--method", "adapter"),
         ("--method given twice",)),
    Case("a flag of another PEFT method", "train.py",
         lambda w, t: finetune_args(w, t / "run", "--init_from", w / "base/ckpt", "--method", "lora", "--adapter_len", "5"),
         ("--adapter_len", "--method adapter", "not by --method lora")),
    Case("instruction records longer than --seq_len", "train.py",
         lambda w, t: finetune_args(w, t / "run", "--init_from", w / "base/ckpt", "--data", t / "long.jsonl"),
         ("--seq_len 32", "raise --seq_len to at least"),
         prepare=lambda w, t: (t / "long.jsonl").write_text((json.dumps(
             {"instruction": "Say it. " * 40, "input": "", "output": "Done."}) + "\n") * 30)),
    Case("a 70B model on this machine", "train.py", lambda w, t: ["--model", "llama2-70b", "--out_dir", t / "run",
                                                                  "--data", w / "data", "--cache_dir", w / "cache"],
         ("--model llama2-70b", "needs about 1,0", "GiB free", "smaller --model")),
    # -- what a run writes: never over another run or its own base
    Case("an --out_dir that holds another run", "train.py", lambda w, t: run_args(w, w / "again"),
         ("--out_dir", "holds a run at step 4", "--resume", "--overwrite"),
         prepare=lambda w, t: copy_run(w, "again"), kept=lambda w, t: [w / "base", w / "again"]),
    Case("--init_from a checkpoint the run would replace", "train.py",
         lambda w, t: finetune_args(w, w / "own", "--init_from", w / "own/ckpt", "--overwrite"),
         ("--init_from", "own/ckpt is the checkpoint this run would write", "another --out_dir"),
         prepare=lambda w, t: copy_run(w, "own"), kept=lambda w, t: [w / "base", w / "own"]),
    Case("--init_from with another tokenizer", "train.py",
         lambda w, t: finetune_args(w, t / "run", "--init_from", w / "base/ckpt", "--tokenizer", t / "other.model"),
         ("--tokenizer", "other.model is not the tokenizer of --init_from", "--allow_other_tokenizer"),
         prepare=lambda w, t: other_tokenizer(w, t / "other.model")),
    # -- tokenizers
    Case("a tokenizer of another size in the checkpoint", "generate.py",
         lambda w, t: ["--checkpoint", t / "copy", "--prompt", "KING."],
         ("copy/tokenizer.model", "copy/config.json", "do not belong together", "trained with"),
         prepare=lambda w, t: checkpoint_copy(w, t, lambda d: bigger_tokenizer(w, d))),
    Case("tokenizer_config.json with a bos_token of the wrong type", "generate.py",
         lambda w, t: ["--checkpoint", t / "copy", "--prompt", "KING."],
         ("copy/tokenizer_config.json", "bos_token must be a token's text", "got 5"),
         prepare=lambda w, t: checkpoint_copy(w, t, lambda d: tokenizer_json_instead(d, bos_token=5))),

    Case("an --out_dir that is a file", "train.py", lambda w, t: run_args(w, t / "file"),
         ("--out_dir", "cannot write there"), prepare=lambda w, t: (t / "file").write_text("mine")),
]


def edit_json(path: Path, **fields) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def hf_copy(world, tmp_path, **fields) -> None:
    """The base exported for transformers (TMP/hf), its config.json then edited."""
    assert run_script("weights_convert.py", world / "base/ckpt", tmp_path / "hf", "--to", "hf").code == 0
    edit_json(tmp_path / "hf" / "config.json", **fields)


def peft_copy(world, tmp_path, damage) -> None:
    shutil.copytree(world / "lora" / "peft", tmp_path / "lora")
    damage(tmp_path / "lora")


def other_tokenizer(world, path: Path) -> None:
    """A tokenizer of the base's size trained on other text: the same vocabulary size, other ids."""
    from llama_min import Tokenizer

    (path.parent / "other.txt").write_text((world / "data" / "train.txt").read_text()[::-1])
    Tokenizer.train([path.parent / "other.txt"], path, vocab_size=384)


def bigger_tokenizer(world, directory: Path) -> None:
    """A tokenizer of 1,000 tokens in place of the checkpoint's 384-token one."""
    from llama_min import Tokenizer

    Tokenizer.train([world / "data" / "train.txt"], directory / "tokenizer.model", vocab_size=1000)


def tokenizer_json_instead(directory: Path, **config) -> None:
    """A small tokenizer.json (word level) with a tokenizer_config.json of these fields, in place of the
    checkpoint's tokenizer.model."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "[UNK]": 2, "KING.": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer.model").unlink()
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


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
    assert len(err) <= case.extra.get("max_length", 1000), f"{case.name}: a message of {len(err)} characters"
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


def test_an_adapter_on_another_base_of_the_same_shape_is_refused(word_bench, tmp_path):
    """The adapter records its base's fingerprint: a different base of the same config is refused,
    naming the recorded base, unless asked to allow it."""
    base = word_bench / "base" / "ckpt"
    run = run_script("train.py", "--init_from", base, "--method", "lora",
                     "--data", word_bench / "benchmark/instructions/train.jsonl", "--seq_len", "160", "--batch_size", "4", "--max_steps", "2", "--eval_every", "2",
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


def test_resume_of_a_lora_run_finds_it_without_method(word_bench, tmp_path):
    args = ["--init_from", word_bench / "base" / "ckpt", "--data", word_bench / "benchmark/instructions/train.jsonl",
            "--seq_len", "160", "--batch_size", "4", "--eval_every", "2", "--sample_tokens", "0", "--out_dir", tmp_path / "run"]
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
    assert f"resuming {out / 'ckpt'} from step 4" in resumed.out, resumed.out


def under_file_size_limit(limit: int):
    """For a child process: files it writes stop growing at ``limit`` bytes, as on a full disk (the write
    fails with EFBIG instead of the process being killed by SIGXFSZ)."""
    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("limit", [100_000, 300_000])  # fails in model.safetensors / in torch.save of the state
def test_disk_full_while_saving_keeps_the_previous_checkpoint(world, tmp_path, limit):
    """A real limit on file size, not a patched torch.save: the weights (safetensors) or the training
    state (torch.save) cannot be written; torch and safetensors report that in their own error types."""
    out = copy_run(world, f"full_disk_{limit}")
    before = snapshot(out / "ckpt")
    child = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", "--out_dir", str(out), "--max_steps", "6"],
                           capture_output=True, text=True, preexec_fn=under_file_size_limit(limit), timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = child.stderr.strip()
    assert child.returncode == 1 and "could not write the checkpoint" in err and "untouched" in err, err
    assert "\n" not in err and "Traceback" not in err, err
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


def test_ctrl_c_in_generate_keeps_the_text_and_exits_130(world):
    """SIGINT while generate.py answers (or waits for the next question): no traceback, the text so far
    stays on standard output, and the exit status is the one a shell expects of Ctrl-C."""
    child = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), "--checkpoint", str(world / "base/ckpt"),
                              "--interactive", "--max_new_tokens", "200", "--seed", "0"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=interruptible)
    try:
        assert child.stderr.readline().startswith("chat with"), child.stderr.read()
        child.stdin.write("KING.\n")
        child.stdin.flush()
        child.stdout.read(3)  # "> " and the answer's first character: it is streaming
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()  # a chat left waiting after a failure must not outlive the test
    assert child.returncode == 130 and "Traceback" not in err and err.strip().endswith("interrupted"), err


def test_a_second_train_py_on_one_out_dir_is_refused_naming_the_first(world, tmp_path):
    from llama_min.training.out_dir import out_dir_lock

    with out_dir_lock(tmp_path / "busy", master=True):  # as a train.py still running there holds it
        done = run_script("train.py", *run_args(world, tmp_path / "busy"))
    assert done.code == 1 and "is in use by train.py (pid" in done.err and "\n" not in done.err.strip(), done.err
    assert not (tmp_path / "busy").exists(), "the second run wrote something"


def test_a_text_file_without_line_breaks_is_split_by_words(world, tmp_path):
    """60 kB on one line: the held-out split is its last words (it was "the training split is empty")."""
    text = (world / "data" / "train.txt").read_text().replace("\n", " ")
    (tmp_path / "one_line.txt").write_text(text)
    done = run_script("train.py", *run_args(world, tmp_path / "run", "--data", tmp_path / "one_line.txt", "--tokenizer",
                                            world / "base/ckpt/tokenizer.model", "--max_steps", "2"))
    assert done.code == 0, done.err


def test_weights_convert_out_of_space_is_one_line_and_leaves_nothing(world, tmp_path):
    child = subprocess.run([sys.executable, str(ROOT / "weights_convert.py"), str(world / "base/ckpt"),
                            str(tmp_path / "out")], capture_output=True, text=True,
                           preexec_fn=under_file_size_limit(50_000), timeout=600)
    err = child.stderr.strip()
    assert child.returncode == 1 and "could not write" in err and "free disk space" in err, err
    assert "\n" not in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == [], f"left behind: {list(tmp_path.iterdir())}"
