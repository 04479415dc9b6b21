"""benchmarks/gpu_check.py runs where CI can run it: on the CPU, shortened, its GPU-only checks skipped
and said so; the resume and greedy-text checks it makes still compare real runs."""

import subprocess
import sys

from scripts import ROOT


def test_gpu_check_runs_its_cpu_parts():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--quick", "--steps", "6"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    for line in ("1. CUDA tests: skipped (no GPU)", "3. resume: 3 + 3 steps give the losses of 6 straight steps",
                 "5. greedy text", "all checks passed"):
        assert line in done.stdout, done.stdout
