"""Run the repository's scripts (train.py, generate.py, weights_convert.py) as their command lines do.

In this process, through ``runpy`` (a script is run, never imported as a library), so a test costs no
interpreter start-up; stdout, stderr and the exit status are captured. Tests that need a process of
their own (signals, torchrun) start ``python SCRIPT`` themselves.
"""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    code: int  # exit status: 0 on success
    out: str  # standard output
    err: str  # standard error


def run_script(name: str, *argv) -> Run:
    """``python NAME ARGV...`` in this process."""
    path = ROOT / name
    saved_argv, sys.argv = sys.argv, [str(path), *map(str, argv)]
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(path), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved_argv
    return Run(code, out.getvalue(), err.getvalue())


def train(*argv) -> Run:
    """``python train.py ARGV...``, which must succeed."""
    run = run_script("train.py", *argv)
    assert run.code == 0, f"train.py {' '.join(map(str, argv))} failed with status {run.code}:\n{run.err[-3000:]}"
    return run


def metrics(out_dir: Path) -> list[dict]:
    """The records of OUT_DIR/metrics.jsonl."""
    return [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl")]


def train_losses(out_dir: Path) -> list[float]:
    """The logged training losses (one per step with --log_every 1)."""
    return [r["train_loss"] for r in metrics(out_dir) if r["train_loss"] is not None]


def last(out_dir: Path, key: str):
    """The last logged value of a metric (val_loss, val_bpb, dev_accuracy, ...)."""
    return [r[key] for r in metrics(out_dir) if r[key] is not None][-1]


def shakespeare_slice(directory: Path) -> Path:
    """DIRECTORY/data: train.txt and val.txt cut from the shipped corpus (60 kB and 8 kB), for tiny runs."""
    data = Path(directory) / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.txt").write_text((ROOT / "data/shakespeare/train.txt").read_text()[:60_000])
    (data / "val.txt").write_text((ROOT / "data/shakespeare/val.txt").read_text()[:8_000])
    return data
