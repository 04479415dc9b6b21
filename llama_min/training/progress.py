"""What a run shows and leaves behind: a progress line every --log_every steps (loss, learning rate,
tokens/s, MFU, ETA), metrics.jsonl (one JSON record per log step and per evaluation) and loss.png.

MFU, model FLOPs utilisation, is the FLOPs the model's arithmetic needs per second divided by the
hardware's peak (Chowdhery et al. 2022, PaLM, appendix B).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import deque
from contextlib import contextmanager, suppress
from pathlib import Path

import torch

from ..cli import UsageError
from .config import TrainConfig
from .runtime import Runtime

METRICS = ("step", "train_loss", "val_loss", "val_bpb", "dev_accuracy", "lr", "tokens_per_s", "elapsed_s")
# and, when a PEFT method trains, "peft": llama_min.peft.peft_stats at each log step


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token (Chowdhery et al. 2022, PaLM, appendix B): for every weight of a matrix
    a token goes through (not the embedding lookup), 2 in the forward pass, 2 for the gradient of its
    input, 2 for its own gradient; attention's scores and weighted sum add 4·T·dim per layer forward and
    twice that backward (T/2 on average under the causal mask, but kernels skip nothing: PaLM's count).

    What does not train costs less: a frozen matrix needs no gradient of its own, and a layer with
    nothing trainable at or below it (LLaMA-Adapter's lower layers) no backward pass at all. For
    pretraining and full fine-tuning this is PaLM's 6 per weight plus 12·L·T·dim."""
    layers, dim = model.layers, model.config.dim
    trains = [any(p.requires_grad for p in layer.parameters()) for layer in layers]
    lowest = 0 if model.tok_embeddings.weight.requires_grad else next(
        (i for i, t in enumerate(trains) if t), len(layers))

    def matrices(module: torch.nn.Module, backward: bool) -> int:
        return sum(p.numel() * (2 + 2 * backward + 2 * p.requires_grad) for p in module.parameters() if p.dim() == 2)

    total = sum(matrices(layer, i >= lowest) + 4 * seq_len * dim * (1 + 2 * (i >= lowest))
                for i, layer in enumerate(layers))
    head_backward = lowest < len(layers) or model.output.weight.requires_grad
    return total + model.output.weight.numel() * (2 + 2 * head_backward + 2 * model.output.weight.requires_grad)


# Dense tensor-core peaks from NVIDIA's datasheets, FLOP/s, in the dtype each GPU trains in with --dtype
# auto (bfloat16; float16 on V100 and T4). The longest name in the device's name wins, so an L40S is not
# taken for an L4; any other GPU: --peak_flops, or the timed product below.
GPU_PEAK = {"B200": 2250e12, "H200": 989e12, "H100": 989e12, "H100 PCIe": 756e12, "A100": 312e12,
            "A10": 125e12, "L40S": 362e12, "L4": 121e12, "V100": 125e12, "T4": 65e12}


def datasheet_peak(device_name: str) -> float | None:
    """The GPU_PEAK entry whose name is the longest one contained in the device's name, or None."""
    known = [name for name in GPU_PEAK if name in device_name]
    return GPU_PEAK[max(known, key=len)] if known else None


def peak_flops(cfg: TrainConfig, rt: Runtime) -> float:
    """The FLOP/s MFU is measured against: --peak_flops, else the GPU's datasheet peak, else (the CPU or
    an unknown GPU) the fastest of a few large matrix products in the training dtype, timed now. A busy
    machine can time it low; Progress then raises it (and says so)."""
    known = datasheet_peak(torch.cuda.get_device_name(rt.device)) if rt.device.type == "cuda" else None
    if cfg.peak_flops > 0 or known:
        return cfg.peak_flops or known
    n = 4096 if rt.device.type == "cuda" else 1024  # large enough that the GPU is busy, not waiting on launches
    g = torch.Generator(rt.device).manual_seed(0)  # its own: a resumed run's restored RNG must stay untouched
    a = torch.randn(n, n, device=rt.device, dtype=rt.autocast_dtype or torch.float32, generator=g)
    from torch.utils.benchmark import Timer  # (here: it imports setuptools, 0.2 s that only this needs)
    timer = Timer("a @ a", globals={"a": a}, num_threads=torch.get_num_threads())  # (it syncs the GPU)
    return 2 * n**3 / min(timer.blocked_autorange(min_run_time=0.5).times)  # other work only ever slows it


class Progress:
    """The progress line and the metrics file of one run (rank 0 writes; every rank may call).

    The ETA counts everything still to come: the remaining steps at the time a training step takes (the
    median over the last 21 log intervals: one slow step, a pause of the machine, does not swing it, a
    lasting change of speed does), plus the remaining periodic work (held-out evaluations with their
    checkpoints, dev evaluations) at the mean time each kind has taken so far.
    """

    def __init__(self, cfg: TrainConfig, rt: Runtime, model: torch.nn.Module):
        self.cfg, self.rt, self.out_dir = cfg, rt, Path(cfg.out_dir)
        self.flops_per_token = flops_per_token(model, cfg.seq_len)
        self.peak = peak_flops(cfg, rt) * rt.world_size
        self.t_start = time.time()
        self.step_times = deque(maxlen=21)  # seconds per training step of recent log intervals, for the ETA
        self.periodic: dict[str, tuple[int, list[float]]] = {}  # kind -> (every N steps, seconds each time)
        self.restart_clock()

    def forget_after(self, step: int) -> None:
        """Drop the records logged after ``step`` (a resumed run logs those steps again)."""
        path = self.out_dir / "metrics.jsonl"
        if self.rt.master and path.exists():
            tmp = path.with_name("metrics.tmp.jsonl")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in read_metrics(path) if r.get("step", 0) <= step))
            tmp.replace(path)

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.time() - self.t_start

    def restart_clock(self) -> None:
        """Start a new interval for tokens/s (periodic work is not training throughput)."""
        self.t_interval, self.steps, self.tokens = time.time(), 0, 0

    @contextmanager
    def periodic_work(self, kind: str, every: int):
        """Time a piece of work done every ``every`` steps (and at the last), for the ETA; afterwards the
        throughput interval starts afresh."""
        t = time.time()
        yield
        self.periodic.setdefault(kind, (every, []))[1].append(time.time() - t)
        self.restart_clock()

    def eta(self, step: int) -> float:
        """Seconds to the end: the remaining steps, and the remaining periodic work of each kind (logged
        before it, so the work due at ``step`` itself is still to come)."""
        last = self.cfg.max_steps
        remaining = (last - step) * (statistics.median(self.step_times) if self.step_times else 0.0)
        for every, seconds in self.periodic.values():  # due at every multiple of `every`, and at the last step
            remaining += (last // every - (step - 1) // every + (last % every != 0)) * statistics.mean(seconds)
        return remaining

    def step(self, step: int, loss: float, lr: float, tokens: int, stats=None) -> None:
        """After every optimiser step: count it; every --log_every steps print the line and log it, with
        ``stats()`` (a dict) when given."""
        self.steps += 1
        self.tokens += tokens
        if step % self.cfg.log_every and step != self.cfg.max_steps:
            return
        elapsed = time.time() - self.t_interval
        self.step_times.append(elapsed / self.steps)
        tokens_per_s = self.tokens / elapsed
        achieved = self.flops_per_token * tokens_per_s
        if achieved > self.peak:  # the peak measured at start was low (a busy machine): never show > 100%
            self.rt.say(f"(MFU: this interval ran at {achieved / 1e9:.1f} GFLOP/s, above the {self.peak / 1e9:.1f} "
                        "measured at start; that measurement was low, MFU is now against this figure)")
            self.peak = achieved
        eta = self.eta(step)
        self.rt.say(f"step {step}/{self.cfg.max_steps} | loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s | "
                    f"MFU {100 * achieved / self.peak:.1f}% | ETA {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
        self.record(step=step, train_loss=loss, lr=lr, tokens_per_s=tokens_per_s, **({"peft": stats()} if stats else {}))
        self.restart_clock()

    def record(self, **metrics) -> None:
        """Append one record to metrics.jsonl (rank 0): every METRICS key, in that order, then any other."""
        if not self.rt.master:
            return
        record = dict.fromkeys(METRICS) | metrics | {"elapsed_s": self.elapsed()}
        try:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(finite_or_none(record), allow_nan=False) + "\n")
        except OSError as e:
            raise UsageError(f"could not append to {self.out_dir / 'metrics.jsonl'}: {e.strerror or e}; free disk "
                             "space or choose a writable --out_dir") from None

    def plot(self) -> str | None:
        """Redraw loss.png (rank 0): where it was drawn, or why not (None: no loss logged yet)."""
        return plot_losses(self.out_dir) if self.rt.master else None


def finite_or_none(value):
    """``value`` with every NaN or infinite float (in dicts and lists too) replaced by None: JSON has no
    such numbers."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line that is not JSON (the half-written last line of a run that
    was killed mid-write) is skipped."""
    records = []
    for line in path.read_text().splitlines():
        with suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def plot_losses(out_dir: Path) -> str | None:
    """Draw loss.png from metrics.jsonl and say where, or why not (matplotlib missing); None when no loss
    was logged yet."""
    try:
        from matplotlib.figure import Figure  # (no pyplot: no GUI backend, no global figure to close)
    except ImportError:
        return "no loss.png: matplotlib is not installed (pip install matplotlib)"
    path = out_dir / "metrics.jsonl"
    records = read_metrics(path) if path.exists() else []
    fig = Figure(figsize=(7, 4), layout="tight")
    ax = fig.subplots()
    for key, label in (("train_loss", "train"), ("val_loss", "held-out")):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if key == "val_loss" else None)
    if not ax.lines:  # stopped before the first logged loss: nothing to draw
        return None
    ax.set(xlabel="step", ylabel="loss (nats per token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(out_dir / "loss.tmp.png")
    (out_dir / "loss.tmp.png").replace(out_dir / "loss.png")
    return f"loss curve: {out_dir / 'loss.png'}"
