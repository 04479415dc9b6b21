"""Run the whole benchmark: make it, pretrain the benchmark base, fine-tune it with every method, score, tabulate.

    python -m experiments.run_benchmark --out runs/benchmark_table --seeds 0 1 2       # the table in docs/results.md
    python -m experiments.run_benchmark --out /tmp/quick --seeds 0 --pretrain_steps 100 --finetune_steps 20 --methods full

For each seed: ``experiments.make_benchmark`` writes the benchmark (words, facts and tokenizer depend on the seed), train.py
pretrains the base on the benchmark's sentences, and train.py fine-tunes that base on the instruction records
with each method for the same number of steps at the same batch size. Exact-match accuracy on the
held-out words' records (``experiments.evaluate``) is measured before (the base itself: every method starts as
exactly the base) and after. Every training run is ``python train.py`` in a child process, so that its
wall time and peak memory are its own:

    threads       one per child (OMP_NUM_THREADS=1): at this size a second thread gains nothing, and on a
                  shared, loaded machine two threads ran 10x slower (measured: 980 vs 10,281 tokens/s)
    wall time     seconds from starting the child to its exit (interpreter start and imports included)
    peak memory   the child's peak resident set size (ru_maxrss from os.wait4, i.e. the kernel's VmHWM),
                  also given above the baseline of a child that only imports torch and llama_min

Writes OUT/results.json (every figure of every seed) and OUT/table.md (means over the seeds), and prints
the table. Each child's output goes to OUT/seed{S}/{base,METHOD}/train.log.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from llama_min.checkpoint import load_checkpoint, tokenizer_file
from llama_min.finetune.instructions import read_records
from llama_min.finetune.load import load_finetuned
from llama_min.model import Llama
from llama_min.tokenizer import load_tokenizer
from llama_min.training.config import parse_args
from llama_min.training.trainable import choose_trainable

from .evaluate import exact_match
from .make_benchmark import make_benchmark

REPO = Path(__file__).resolve().parents[1]
METHODS = ("full", "adapter", "lora", "bottleneck")
# The benchmark base: dim 128, 4 layers, 4 heads sharing 2 kv heads, pinned here rather than taken from the
# tiny preset, so that the benchmark's figures do not move when the preset does.
BASE_MODEL = ["--dim", "128", "--n_layers", "4", "--n_heads", "4", "--n_kv_heads", "2", "--multiple_of", "32"]
PRETRAIN_SEQ_LEN = 64  # the benchmark's documents are short sentences; 64 tokens hold several
FINETUNE_SEQ_LEN = 128  # drops longer records; the benchmark's are about 60 tokens, and a batch pads to its longest only


def run_child(argv: list[str], log: Path) -> dict:
    """Run ``python train.py ARGV`` in a child process (no ARGV: only its imports); its wall time (s) and
    peak RSS (MB)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    command = ["train.py", *argv] if argv else ["-c", "import torch, llama_min.training.config"]
    start = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen([sys.executable, *command], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
        _, status, usage = os.wait4(child.pid, 0)  # the rusage of this child alone
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    if child.returncode != 0:
        raise RuntimeError(f"train.py {' '.join(argv)} failed with exit code {child.returncode}; see {log}")
    return {"wall_s": wall, "peak_mb": usage.ru_maxrss / 1024}  # ru_maxrss is in KiB on Linux


def load_run(base_ckpt: Path, run_dir: Path) -> Llama:
    """The model a fine-tuning run in run_dir produced: its full checkpoint (full, partial) or the base
    with its adapter (a PEFT method)."""
    if (run_dir / "ckpt").is_dir():
        return load_finetuned(run_dir / "ckpt")
    return load_finetuned(base_ckpt, peft=run_dir / "peft")


def trainable_count(base_ckpt: Path, flags: list[str]) -> int:
    """Parameters that train under train.py's flags, counted by the trainer's own choose_trainable."""
    cfg, _ = parse_args(["--init_from", str(base_ckpt), *flags])
    model = load_checkpoint(base_ckpt)
    choose_trainable(model, cfg)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def pretrain_base(seed_dir: Path, seed: int, steps: int, batch_size: int) -> Path:
    """Make the benchmark of this seed in SEED_DIR/benchmark and pretrain its base; returns the base checkpoint."""
    data, base = seed_dir / "benchmark", seed_dir / "base"
    make_benchmark(data, seed=seed)
    run_child([*BASE_MODEL, "--data", str(data / "pretrain"), "--tokenizer", str(data / "tokenizer.model"),
               "--cache_dir", str(seed_dir / "cache"), "--seq_len", str(PRETRAIN_SEQ_LEN), "--batch_size", str(batch_size),
               "--lr", "3e-3", "--warmup_steps", "50", "--max_steps", str(steps),
               "--eval_every", str(steps), "--log_every", "100", "--sample_tokens", "0",
               "--seed", str(seed), "--out_dir", str(base), "--overwrite"], base / "train.log")
    return base / "ckpt"


def finetune(seed_dir: Path, run_dir: Path, flags: list[str], steps: int, batch_size: int, seed: int) -> dict:
    """Fine-tune SEED_DIR's base on its instruction records with train.py's ``flags`` (method, lr, options)
    into run_dir; the child's wall time and peak memory. A run is redone only when its flags changed, and
    run_dir is this experiment's own, so --overwrite replaces the stale run there."""
    return run_child(["--init_from", str(seed_dir / "base" / "ckpt"),
                      "--data", str(seed_dir / "benchmark" / "instructions" / "train.jsonl"),
                      "--seq_len", str(FINETUNE_SEQ_LEN),
                      "--batch_size", str(batch_size), "--warmup_steps", "10", "--max_steps", str(steps),
                      "--eval_every", str(steps), "--log_every", "25", "--sample_tokens", "0", "--seed", str(seed),
                      "--out_dir", str(run_dir), "--overwrite", *flags], run_dir / "train.log")


def run_seed(out: Path, seed: int, args) -> dict:
    seed_dir = out / f"seed{seed}"
    base = pretrain_base(seed_dir, seed, args.pretrain_steps, args.batch_size)
    eval_records = read_records(seed_dir / "benchmark" / "instructions" / "eval.jsonl")
    tokenizer = load_tokenizer(tokenizer_file(base))
    before = exact_match(load_checkpoint(base), tokenizer, eval_records)["accuracy"]
    print(f"seed {seed}: base exact match {before:.3f}", flush=True)
    results = {}
    for method in args.methods:
        run_dir = seed_dir / method
        lr = args.full_lr if method == "full" else args.peft_lr
        flags = ["--method", method, "--lr", str(lr)]
        cost = finetune(seed_dir, run_dir, flags, args.finetune_steps, args.batch_size, seed)
        after = exact_match(load_run(base, run_dir), tokenizer, eval_records)["accuracy"]
        trainable = trainable_count(base, flags)
        results[method] = {"trainable": trainable, "before": before, "after": after, "lr": lr, **cost}
        print(f"seed {seed}: {method:<10} exact match {before:.3f} -> {after:.3f}, {trainable:,} trainable, "
              f"{cost['wall_s']:.0f} s, peak {cost['peak_mb']:.0f} MB", flush=True)
    return results


def table(per_seed: dict[int, dict], baseline_mb: float) -> str:
    seeds = sorted(per_seed)
    methods = list(per_seed[seeds[0]])
    lines = [f"| method | trainable | exact match before | exact match after (seeds {', '.join(map(str, seeds))}) "
             f"| mean after | wall time | peak RSS (above baseline) |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for m in methods:
        rows = [per_seed[s][m] for s in seeds]
        mean = lambda k: statistics.mean(r[k] for r in rows)  # noqa: E731
        lines.append(f"| {m} | {rows[0]['trainable']:,} | {mean('before'):.3f} | "
                     f"{' / '.join(format(r['after'], '.3f') for r in rows)} | **{mean('after'):.3f}** | "
                     f"{mean('wall_s'):.0f} s | {mean('peak_mb'):.0f} MB ({mean('peak_mb') - baseline_mb:+.0f} MB) |")
    return "\n".join(lines)


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every benchmark report shares: where it works, which seeds, and the training budget."""
    parser.add_argument("--out", required=True, help="working directory (one subdirectory per seed)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="benchmark, training (and perturbation) seeds")
    parser.add_argument("--pretrain_steps", type=int, default=800, help="optimiser steps of the benchmark base")
    parser.add_argument("--finetune_steps", type=int, default=150, help="optimiser steps of every fine-tuning")
    parser.add_argument("--batch_size", type=int, default=16, help="sequences per step, pretraining and fine-tuning")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_arguments(parser)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods to compare")
    parser.add_argument("--full_lr", type=float, default=1e-3, help="peak learning rate of full fine-tuning")
    parser.add_argument("--peft_lr", type=float, default=1e-2, help="peak learning rate of the PEFT methods")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the scoring here, like the children (see the docstring)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    baseline_mb = run_child([], out / "baseline.log")["peak_mb"]
    per_seed = {seed: run_seed(out, seed, args) for seed in args.seeds}
    text = table(per_seed, baseline_mb)
    print(text)
    (out / "table.md").write_text(text + "\n")
    summary = {"args": vars(args), "baseline_peak_mb": baseline_mb, "torch": torch.__version__,
               "results": {str(s): r for s, r in per_seed.items()}}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
