"""The GPU check: what a maintainer with one CUDA GPU runs, in a few minutes, to see the CUDA path work.

    python benchmarks/gpu_check.py                 # on a GPU machine: every check, full length
    python benchmarks/gpu_check.py --quick         # anywhere: the same checks, short; on a CPU the GPU-only
                                                   # ones are skipped and said so (CI runs this)

1. the test suite's CUDA tests (``pytest -m cuda``: the CPU tests' equalities, run on the GPU)
2. training, bf16 autocast, without and with --compile: tokens/s, MFU, peak GPU memory
3. a resume: N/2 steps, then --resume to N, gives the losses of N straight steps
4. generation tokens/s (bf16 on the GPU)
5. the greedy text of the trained model on the GPU (float32) equals the CPU's
6. --fsdp under torchrun on the one GPU (FSDP2's bfloat16 policy): it trains, near the unsharded run's losses
7. peak GPU memory of full, LoRA and LLaMA-Adapter training of the 135M shape, without and with
   --activation_checkpointing (benchmarks/peft_memory.py)

Every step runs the project's own commands (train.py, generate.py, pytest) in child processes; their
figures are read from what they print and from metrics.jsonl. Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run(*argv, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(map(str, argv))}\n{done.stderr[-3000:]}")
    return done


def losses(out: Path) -> list[float]:
    return [r["train_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["train_loss"] is not None]


def last_progress(stdout: str) -> str:
    return [line for line in stdout.splitlines() if line.startswith("step ") and "tok/s" in line][-1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (CI); on a CPU the GPU-only checks are skipped")
    parser.add_argument("--steps", type=int, default=0, help="training steps (default: 200, --quick 20)")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    steps = args.steps or (20 if args.quick else 200)
    print(f"torch {torch.__version__}; device: {torch.cuda.get_device_name() if gpu else 'CPU (no GPU: GPU-only checks skipped)'}")
    failures = []
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    common = ["--max_steps", steps, "--eval_every", steps, "--log_every", max(1, steps // 10), "--sample_tokens", "0",
              "--device", device, "--cache_dir", work / "cache", "--decay_steps", steps]
    if not gpu:
        common += ["--dim", "64", "--n_layers", "2"]  # the CPU only proves the checks run

    # 1. the CUDA tests
    if gpu:
        done = run("-m", "pytest", "-q", "-m", "cuda", "tests", check=False)
        print(f"1. CUDA tests: {done.stdout.strip().splitlines()[-1]}")
        if done.returncode != 0:
            failures.append("CUDA tests")
    else:
        print("1. CUDA tests: skipped (no GPU)")

    # 2. training, with and without --compile
    for compiled in ([False, True] if gpu else [False]):
        out = work / ("compiled" if compiled else "eager")
        t = time.perf_counter()
        done = run("train.py", *common, "--out_dir", out, "--dtype", "bfloat16" if gpu else "float32",
                   *(["--compile"] if compiled else []))
        peak = re.search(r"peak GPU memory [\d.]+ GB", done.stdout)
        print(f"2. training {'with' if compiled else 'without'} --compile, {steps} steps in {time.perf_counter() - t:.0f} s: "
              f"{last_progress(done.stdout).split(' | ', 3)[3]}" + (f", {peak.group()}" if peak else ""))

    # 3. a resume gives the straight run's losses
    half = work / "halves"
    run("train.py", *common, "--out_dir", half, "--max_steps", steps // 2)
    run("train.py", "--resume", "--out_dir", half, "--max_steps", steps)
    straight = losses(work / "eager")
    resumed = losses(half)
    same = len(resumed) == len(straight) and all(abs(a - b) <= 1e-3 * max(1, abs(b)) for a, b in zip(resumed, straight))
    print(f"3. resume: {steps // 2} + {steps - steps // 2} steps {'give' if same else 'DO NOT give'} the losses of "
          f"{steps} straight steps")
    if not same:
        failures.append("resume")

    # 4. generation speed, 5. the greedy text on the GPU equals the CPU's
    ckpt = work / "eager" / "ckpt"
    prompt = ["--checkpoint", ckpt, "--prompt", "ROMEO.", "--temperature", "0", "--max_new_tokens", "64"]
    fast = run("generate.py", *prompt, "--device", device, "--dtype", "bfloat16" if gpu else "float32")
    print(f"4. generation ({'bfloat16' if gpu else 'float32'} on {device}): {fast.stderr.strip().splitlines()[-1]}")
    texts = {d: run("generate.py", *prompt, "--device", d, "--dtype", "float32").stdout for d in {device, "cpu"}}
    equal = len(set(texts.values())) == 1
    print(f"5. greedy text on {device} and on the CPU (float32): {'equal' if equal else 'DIFFERENT'}"
          + ("" if gpu else " (both on the CPU here)"))
    if not equal:
        failures.append("greedy text")

    # 6. FSDP on one GPU (the CPU runs it with two processes in tests/test_distributed.py)
    if gpu:
        sharded = work / "fsdp"
        t = time.perf_counter()
        done = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py", *common,
                   "--out_dir", sharded, "--dtype", "bfloat16", "--fsdp")
        gap = max(abs(a - b) / abs(b) for a, b in zip(losses(sharded), straight))
        peak = re.search(r"peak GPU memory [\d.]+ GB", done.stdout)
        print(f"6. --fsdp, one process, {steps} steps in {time.perf_counter() - t:.0f} s: losses within {gap:.1%} of "
              f"the unsharded run's" + (f", {peak.group()}" if peak else ""))
        if not gap < 0.05:
            failures.append("fsdp")
    else:
        print("6. --fsdp on the GPU: skipped (no GPU; tests/test_distributed.py runs it on two CPU processes)")

    # 7. activation checkpointing's memory on the GPU
    if gpu:
        done = run("benchmarks/peft_memory.py", "--methods", "full", "lora", "adapter", "--device", "cuda",
                   "--steps", 2 if args.quick else 3)
        print("7. training memory with and without --activation_checkpointing:\n   " +
              "\n   ".join(done.stdout.strip().splitlines()))
    else:
        print("7. activation checkpointing memory on the GPU: skipped (no GPU)")
    print("all checks passed" if not failures else f"FAILED: {', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
