"""Whether ``keep_freed_memory`` (``llama_min/training/runtime.py``: two glibc ``mallopt`` calls) pays on a CPU.

    python benchmarks/cpu_allocator.py                 # 30 steps of the default run's model and batch, 5 pairs
    python benchmarks/cpu_allocator.py --steps 100 --pairs 3 --threads 2

Each run is a fresh process (mallopt is process-wide) that takes the training steps of ``train.py``'s
default run (the tiny preset, batch 8 x 256, AdamW), with the call or with glibc's defaults. The two
kinds alternate, so a machine that other jobs make slower slows both alike; the ratio of each pair is
printed, then the medians. Prints nothing useful off glibc, where the call does nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

STEPS = """
import json, resource, sys, time, torch
from llama_min import Llama, ModelConfig
from llama_min.training.runtime import keep_freed_memory
steps, threads, keep = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "keep"
torch.set_num_threads(threads)
if keep:
    keep_freed_memory()
torch.manual_seed(0)
model = Llama(ModelConfig.from_preset("tiny"))
optimizer = torch.optim.AdamW(model.parameters())
rows = torch.randint(0, model.config.vocab_size, (8, 257))
start, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
for _ in range(steps):
    _, loss = model(rows[:, :-1], rows[:, 1:])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
end = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": time.perf_counter() - start, "sys_s": end.ru_stime - usage.ru_stime,
                  "faults": end.ru_minflt - usage.ru_minflt, "peak_mib": end.ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per run")
    parser.add_argument("--pairs", type=int, default=5, help="runs of each kind, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a busy machine)")
    args = parser.parse_args()
    runs = {"keep": [], "default": []}
    for pair in range(args.pairs):
        for kind in runs:
            out = subprocess.run([sys.executable, "-c", STEPS, str(args.steps), str(args.threads), kind],
                                 capture_output=True, text=True, check=True).stdout
            runs[kind].append(json.loads(out))
        keep, default = runs["keep"][-1], runs["default"][-1]
        print(f"pair {pair + 1}: {keep['seconds']:.2f} s with keep_freed_memory, {default['seconds']:.2f} s without "
              f"({keep['seconds'] / default['seconds']:.3f}x)", flush=True)
    print(f"{args.steps} steps, {args.threads} thread(s), median of {args.pairs} fresh processes each:")
    for kind, label in (("keep", "keep_freed_memory"), ("default", "glibc defaults")):
        median = {k: statistics.median(r[k] for r in runs[kind]) for k in runs[kind][0]}
        print(f"  {label:18} {median['seconds']:6.2f} s  system {median['sys_s']:5.2f} s  "
              f"{median['faults']:>9,.0f} minor page faults  peak RSS {median['peak_mib']:.0f} MiB")
    ratios = [k["seconds"] / d["seconds"] for k, d in zip(runs["keep"], runs["default"])]
    print(f"  time with / without: median {statistics.median(ratios):.3f}x (range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
