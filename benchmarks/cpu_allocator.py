"""Whether glibc's malloc, kept from handing freed blocks back to the system, makes CPU training faster.

    python benchmarks/cpu_allocator.py                 # 30 steps of the default run's model and batch, 5 pairs
    python benchmarks/cpu_allocator.py --steps 100 --pairs 3 --threads 2

On a CPU every tensor comes from malloc. glibc serves large blocks with mmap and returns freed memory at
the top of its heap to the system, so a training step that frees and allocates the same large tensors
again can fault their pages in anew each time. Two environment variables that glibc reads at start-up
stop that: ``MALLOC_MMAP_THRESHOLD_`` (blocks up to this size come from the heap) and
``MALLOC_TRIM_THRESHOLD_`` (this much freed heap stays with the process). Each run is a fresh process
taking the training steps of ``train.py``'s default run (the tiny preset, batch 8 x 256, AdamW), with the
two set high (32 MiB and 1 GiB) or with glibc's defaults. The two kinds alternate, so a machine that other
jobs make slower slows both alike; the ratio of each pair is printed, then the medians. Off glibc the
variables do nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

KEEP_FREED = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}

STEPS = """
import json, resource, sys, time, torch
from llama_min import Llama, ModelConfig
steps, threads = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
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
    defaults = {k: v for k, v in os.environ.items() if k not in KEEP_FREED}
    environments = {"keep": defaults | KEEP_FREED, "default": defaults}
    runs = {kind: [] for kind in environments}
    for pair in range(args.pairs):
        for kind, env in environments.items():
            out = subprocess.run([sys.executable, "-c", STEPS, str(args.steps), str(args.threads)], env=env,
                                 capture_output=True, text=True, check=True).stdout
            runs[kind].append(json.loads(out))
        keep, default = runs["keep"][-1], runs["default"][-1]
        print(f"pair {pair + 1}: {keep['seconds']:.2f} s keeping freed memory, {default['seconds']:.2f} s with "
              f"glibc's defaults ({keep['seconds'] / default['seconds']:.3f}x)", flush=True)
    print(f"{args.steps} steps, {args.threads} thread(s), median of {args.pairs} fresh processes each:")
    for kind, label in (("keep", "freed memory kept"), ("default", "glibc defaults")):
        median = {k: statistics.median(r[k] for r in runs[kind]) for k in runs[kind][0]}
        print(f"  {label:18} {median['seconds']:6.2f} s  system {median['sys_s']:5.2f} s  "
              f"{median['faults']:>9,.0f} minor page faults  peak RSS {median['peak_mib']:.0f} MiB")
    ratios = [k["seconds"] / d["seconds"] for k, d in zip(runs["keep"], runs["default"])]
    print(f"  time kept / defaults: median {statistics.median(ratios):.3f}x (range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
