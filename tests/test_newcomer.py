"""What a newcomer meets running every documented command in a fresh clone: no command overwrites
what another wrote, what they create is ignored by git, and the help and figures they print are true."""

from __future__ import annotations

import re
import shlex
import subprocess
from collections import defaultdict

import pytest

from scripts import ROOT, run_script

# User docs (results.md records commands that were run, as they were run).
DOCS = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "results.md")]


def documented_commands(script: str) -> list[tuple[str, list[str]]]:
    """(doc, argv) of every `python SCRIPT` / `torchrun ... SCRIPT` line in the docs' code blocks."""
    found = []
    for doc in DOCS:
        fenced = False
        for line in doc.read_text().replace("\\\n", " ").splitlines():
            if line.strip().startswith("```"):
                fenced = not fenced
                continue
            if not (fenced or line.startswith("    ")):
                continue
            command = line.split(" #")[0].strip().removeprefix("$ ")
            args = shlex.split(command) if f"{script}" in command.split(" ")[:3] else []
            if args and args[0] in ("python", "torchrun"):
                found.append((doc.name, args[args.index(script) + 1:]))
    return found


def test_every_documented_training_run_writes_its_own_directory():
    """Each distinct train.py command of the docs has its own --out_dir (the default out/ belongs to the
    default run), and none writes into the checkpoint it starts from."""
    runs = defaultdict(set)
    for doc, args in documented_commands("train.py"):
        if "--resume" in args or "--help" in args:
            continue
        out = args[args.index("--out_dir") + 1] if "--out_dir" in args else "out"
        runs[out].add(" ".join(args))
        if "--init_from" in args:
            base = args[args.index("--init_from") + 1]
            assert not base.startswith(out.rstrip("/") + "/"), f"{doc}: train.py {' '.join(args)} writes into its base"
    shared = {out: commands for out, commands in runs.items() if len(commands) > 1}
    assert not shared, f"documented runs that overwrite each other: {shared}"


def test_what_documented_commands_create_is_ignored_by_git(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    made = ["out/ckpt/model.safetensors", "runs/lora/peft/peft.json", "ckpt/tinyllama/config.json",
            "hf/tiny/config.json", "handout/lab01.md", "alpaca.jsonl", "data/cache/x/tokenizer.model"]
    ignored = subprocess.run(["git", "check-ignore", *made], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert sorted(ignored) == sorted(made), f"not ignored: {sorted(set(made) - set(ignored))}"


def test_generate_help_is_grouped_and_says_each_default_once():
    done = run_script("generate.py", "--help")
    assert done.code == 0
    for group in ("model:", "prompt:", "sampling:"):
        assert f"\n{group}\n" in done.out, f"no {group} section in --help"
    entries = [" ".join(e.split()) for e in re.split(r"\n(?=  -)", done.out)]  # one per flag
    twice = [e for e in entries if e.count("default") > 1]
    assert not twice, twice
    interpolate = next(e for e in entries if e.startswith("--interpolate "))
    assert "(default: off)" in interpolate, interpolate
    dtype = next(e for e in entries if e.startswith("--dtype "))
    assert "float32, bfloat16, float16" in dtype, dtype


def test_train_help_lists_the_values_of_dtype_and_attn_impl():
    flat = " ".join(run_script("train.py", "--help").out.split())
    assert "--dtype {auto,float32,bfloat16,float16}" in flat
    assert "--attn_impl {sdpa,plain}" in flat


def test_the_throughput_benchmark_never_reports_mfu_above_100_percent(monkeypatch):
    """A busy machine times the start-up matmul peak low; the benchmark then measures MFU against the
    fastest step, as train.py does, instead of printing 120%."""
    import llama_min.training.progress as progress

    monkeypatch.setattr(progress, "peak_flops", lambda cfg, rt: 1e6)  # 1 MFLOP/s: every step beats it
    done = run_script("benchmarks/train_throughput.py", "--shapes", "tiny", "--steps", "1", "--rounds", "1")
    assert done.code == 0, done.err
    figures = [float(m) for m in re.findall(r"MFU\s+([\d.]+)%", done.out)]
    assert figures and max(figures) <= 100.0, done.out
    assert "MFU is against the step's figure" in done.out


def test_a_run_says_its_model_flags_its_last_evaluation_and_takes_threads(tmp_path):
    """The model line names the flags that changed the preset; the last line gives the held-out figures
    rounded and with the step they belong to (never "None"); --threads sets torch's CPU threads."""
    import torch

    from scripts import shakespeare_slice

    shakespeare_slice(tmp_path)
    threads = torch.get_num_threads()
    try:
        done = run_script("train.py", "--dim", "32", "--n_layers", "1", "--n_heads", "2", "--multiple_of", "16",
                          "--vocab_size", "384", "--data", tmp_path / "data", "--cache_dir", tmp_path / "cache",
                          "--seq_len", "32", "--batch_size", "2", "--max_steps", "3", "--eval_every", "2",
                          "--eval_tokens", "256", "--sample_tokens", "0", "--out_dir", tmp_path / "out",
                          "--threads", "1")
        assert done.code == 0, done.err
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert "model: tiny --dim 32 --n_layers 1 --n_heads 2 --multiple_of 16 --vocab_size 384," in done.out, done.out
    assert "training a 384-token tokenizer on" in done.out, "nothing shows while the tokenizer trains"
    last = done.out.strip().splitlines()[-1]
    assert "None" not in last and re.search(r"held-out loss \d+\.\d{4}, \d+\.\d{4} bits per byte \(at step 3\)", last), last
