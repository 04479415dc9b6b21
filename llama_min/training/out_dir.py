"""The run's output directory belongs to one run at a time: a new run does not replace another run's
checkpoint or append to its metrics.jsonl unless asked (--overwrite), never writes over the checkpoint
it starts from, and two train.py processes never write into one directory together (a lock file).

    OUT_DIR/.train.lock   held (flock) by the train.py writing OUT_DIR; it names that process, and goes
                          when that process ends
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..cli import UsageError
from .config import TrainConfig
from .progress import read_metrics

try:
    import fcntl
except ImportError:  # Windows: no lock
    fcntl = None

LOCK_FILE = ".train.lock"
RUN_FILES = ("metrics.jsonl", "ckpt/train_state.pt", "peft/train_state.pt")  # what shows a run was here


def previous_run(out: Path) -> str | None:
    """A description of the run OUT_DIR holds (its last logged step and when it wrote), or None."""
    found = [out / name for name in RUN_FILES if (out / name).is_file()]
    if not found:
        return None
    newest = max(found, key=lambda p: p.stat().st_mtime)
    records = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
    step = max((r.get("step", 0) for r in records), default=None)
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(newest.stat().st_mtime))
    return f"a run at step {step}, last written {when}" if step is not None else f"a run last written {when}"


def check_out_dir(cfg: TrainConfig, checkpoint: Path) -> None:
    """Refuse to write over another run or over this run's own base; with --overwrite, forget the old
    run's log (metrics.jsonl, loss.png: files train.py wrote) so that the new one starts its own."""
    out = Path(cfg.out_dir)
    targets = {checkpoint.resolve(), (out / "best").resolve(), (out / "merged").resolve()}
    if cfg.init_from and Path(cfg.init_from).resolve() in targets:
        raise UsageError(f"--init_from {cfg.init_from} is the checkpoint this run would write ({checkpoint}): it "
                         "would replace its own base; choose another --out_dir")
    found = None if cfg.resume else previous_run(out)
    if found and not cfg.overwrite:
        raise UsageError(f"--out_dir {out} holds {found}; this run would replace its checkpoint and add to its "
                         "metrics.jsonl: choose another --out_dir, continue it with --resume, or replace it with "
                         "--overwrite")
    if found:
        for name in ("metrics.jsonl", "loss.png"):
            (out / name).unlink(missing_ok=True)


@contextmanager
def out_dir_lock(out_dir: str | Path, master: bool) -> Iterator[None]:
    """Hold OUT_DIR/.train.lock while the block runs (rank 0 only), or refuse naming the process that holds
    it. An flock is released by the system when its process ends, however it ends, so a lock left by a
    killed run never blocks the next one. (No lock where fcntl is missing: Windows.)"""
    if not master:
        yield
        return
    out = Path(out_dir)
    created, lock = not out.exists(), out / LOCK_FILE
    made_lock = not lock.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a+")
    except OSError as e:
        raise UsageError(f"--out_dir {out}: cannot write there ({e.strerror or e}); choose a writable directory") from None
    with handle:  # (closing it releases the flock)
        try:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise UsageError(f"--out_dir {out} is in use by {handle.read().strip() or 'another process'}; wait for it "
                             "to finish or choose another --out_dir") from None
        handle.truncate(0)  # (opened for appending: the name goes at the start of the emptied file)
        handle.write(f"train.py (pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')})")
        handle.flush()
        try:
            yield
        finally:
            if made_lock:  # ours: leave no trace of it (a lock file a killed run left stays)
                lock.unlink()
            if created and not any(out.iterdir()):  # a run that wrote nothing
                out.rmdir()
