"""Where a training process runs: its device, its rank among the processes, its numeric mode, and the
signals that ask it to stop.

One process on a CPU or a GPU, or several started by ``torchrun`` (DistributedDataParallel: NCCL on GPUs,
gloo on CPUs). The device and dtype are chosen once, here, and passed to everything else.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..cli import UsageError, pick_device


@dataclass
class Runtime:
    """This process's device, rank and numeric mode."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    autocast_dtype: torch.dtype | None = None  # None: plain float32
    use_grad_scaler: bool = False  # float16 needs loss scaling; bfloat16 has float32's range

    @property
    def master(self) -> bool:
        return self.rank == 0

    def say(self, *args, **kwargs) -> None:
        """print, on rank 0 only: one voice for all the processes."""
        if self.master:
            print(*args, **kwargs)

    def all_sum(self, t: torch.Tensor) -> float:
        """The sum of ``t`` over every process (in place), as a number."""
        if self.world_size > 1:
            dist.all_reduce(t)  # (gloo has no AVG: callers divide what needs dividing)
        return t.item()

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def memory_note(self) -> str:
        """", peak GPU memory X GB" on CUDA (what a run needed, for sizing the next), else nothing."""
        if self.device.type != "cuda":
            return ""
        return f", peak GPU memory {torch.cuda.max_memory_allocated(self.device) / 2**30:.2f} GB"

    @property
    def precision(self) -> str:
        """The arithmetic of this run's forward passes, for messages."""
        return f"{str(self.autocast_dtype).removeprefix('torch.')} autocast" if self.autocast_dtype else "float32"


@contextmanager
def exact_float32():
    """float32 matrix products computed in float32 on GPUs too: TF32, which setup_runtime turns on for
    training speed, switched off for the block (scores compared across runs and with experiments/,
    which never turns it on)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def setup_runtime(device_name: str, dtype_name: str) -> Runtime:
    """Pick the device and dtype; join the process group when started by torchrun."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    device = pick_device(device_name)
    if distributed:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if device.type == "cuda":
        if distributed:  # one GPU per process
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 for float32 matmuls
    autocast_dtype = choose_autocast_dtype(dtype_name, device)
    return Runtime(device, rank, world, autocast_dtype, use_grad_scaler=autocast_dtype == torch.float16)


def choose_autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """--dtype: None for plain float32, else the autocast dtype. auto: float32 on the CPU; on CUDA
    bfloat16 where the GPU computes it natively (Ampere and newer), float16 with a gradient scaler
    otherwise: V100 and T4 only emulate bfloat16, which ``is_bf16_supported()`` counts unless told not to."""
    native_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    if name == "auto":
        name = ("bfloat16" if native_bf16 else "float16") if device.type == "cuda" else "float32"
    if name not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"--dtype {name!r}: expected auto, float32, bfloat16 or float16")
    if name == "float16" and device.type != "cuda":
        raise UsageError("--dtype float16 needs CUDA (it trains with a gradient scaler); use bfloat16 on CPU")
    if name == "bfloat16" and device.type == "cuda" and not native_bf16:
        raise UsageError("--dtype bfloat16: this GPU only emulates it (slowly); use float16")
    return None if name == "float32" else getattr(torch, name)


class StopRequest:
    """SIGINT / SIGTERM ask the loop to stop after the current step; it saves, and the process exits with
    128 + the signal's number (130, 143), as shells and job schedulers expect of a process a signal
    ended. A second signal during that save is ignored: the save is atomic anyway, so nothing can tear.

    Under torchrun both are caught too. Ctrl-C reaches torchrun, which forwards SIGINT to its workers;
    a scheduler's SIGTERM (preemption, a time limit) reaches torchrun or every process. A signal that
    reaches one process only still stops them all after the same step (``agreed``). When a worker has
    crashed, torchrun sends SIGTERM to the others: their next collective fails (gloo) or waits until
    torchrun's SIGKILL 30 s later (NCCL); in both cases the last good checkpoint stays on disk.
    """

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.requested: signal.Signals | None = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        self.requested = signal.Signals(signum)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def agreed(self) -> signal.Signals | None:
        """The stop request, agreed by every process (a signal may reach one process only)."""
        if self.rt.world_size == 1:
            return self.requested
        number = torch.tensor(self.requested.value if self.requested else 0, device=self.rt.device)
        dist.all_reduce(number, op=dist.ReduceOp.MAX)
        return signal.Signals(number.item()) if number.item() else None
