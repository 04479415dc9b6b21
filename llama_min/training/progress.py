"""What a run shows and leaves behind: a progress line every --log_every steps (loss, learning rate,
tokens/s, MFU, ETA), metrics.jsonl (one JSON record per log step and per evaluation) and loss.png.

MFU, model FLOPs utilisation, is the FLOPs the model's arithmetic needs per second divided by the
hardware's peak (Chowdhery et al. 2022, PaLM, appendix B).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..config import ModelConfig
from .config import TrainConfig
from .runtime import Runtime

METRICS = ("step", "train_loss", "val_loss", "val_bpb", "dev_accuracy", "lr", "tokens_per_s", "elapsed_s")
# and, when a PEFT method trains, "peft": llama_min.peft.peft_stats at each log step


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight (forward 2, backward 4) for every matrix a token goes
    through (not the embedding lookup), plus attention's scores and weighted sum, 6·2·L·T·dim
    (Chowdhery et al. 2022, PaLM, appendix B; T/2 on average under the causal mask, as kernels skip
    nothing here we keep PaLM's count)."""
    d, L, h = config.dim, config.n_layers, config.ffn_hidden_dim
    kv = config.n_kv_heads * config.head_dim
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * h
    matmul_weights = L * per_layer + d * config.vocab_size
    return 6 * matmul_weights + 12 * L * seq_len * d


# Dense bf16 tensor-core peaks from the vendors' datasheets, FLOP/s.
GPU_BF16_PEAK = {"H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
                 "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops(cfg: TrainConfig, rt: Runtime) -> float:
    """The FLOP/s MFU is measured against: --peak_flops, else the GPU's datasheet bf16 peak, else (CPU
    or an unknown GPU) the best of a few large matmuls in the training dtype, timed now."""
    if cfg.peak_flops > 0:
        return cfg.peak_flops
    if rt.device.type == "cuda":
        name = torch.cuda.get_device_name(rt.device)
        for key, flops in GPU_BF16_PEAK.items():
            if key in name:
                return flops
    n = 1024
    dtype = rt.autocast_dtype or torch.float32
    g = torch.Generator(rt.device).manual_seed(0)  # its own: a resumed run's restored RNG must stay untouched
    a, b = (torch.randn(n, n, device=rt.device, dtype=dtype, generator=g) for _ in range(2))
    best = float("inf")
    for _ in range(10):  # the best of several: other work on the machine only ever slows a run down
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


class Progress:
    """The progress line and the metrics file of one run (rank 0 writes; every rank may call)."""

    def __init__(self, cfg: TrainConfig, rt: Runtime, config: ModelConfig, resumed_at: int | None = None):
        self.cfg, self.rt = cfg, rt
        self.out_dir = Path(cfg.out_dir)
        self.flops_per_token = flops_per_token(config, cfg.seq_len)
        self.peak = peak_flops(cfg, rt) * rt.world_size
        self.t_start = time.time()
        if rt.master:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if resumed_at is not None:  # forget what was logged after the checkpoint: those steps run again
                forget_metrics_after(self.out_dir, resumed_at)
        self.restart_clock()

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.time() - self.t_start

    def restart_clock(self) -> None:
        """Start a new interval for tokens/s (evaluation and checkpoints are not training throughput)."""
        self.t_interval, self.steps, self.tokens = time.time(), 0, 0

    def step(self, step: int, loss: float, lr: float, tokens: int, stats=None) -> None:
        """After every optimiser step: count it; every --log_every steps print the line and log it, with
        ``stats()`` (a dict) when given."""
        self.steps += 1
        self.tokens += tokens
        if step % self.cfg.log_every and step != self.cfg.max_steps:
            return
        elapsed = time.time() - self.t_interval
        tokens_per_s = self.tokens / elapsed
        eta = (self.cfg.max_steps - step) * elapsed / self.steps
        self.rt.say(f"step {step}/{self.cfg.max_steps} | loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s | "
                    f"MFU {100 * self.flops_per_token * tokens_per_s / self.peak:.1f}% | "
                    f"ETA {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
        self.record(step=step, train_loss=loss, lr=lr, tokens_per_s=tokens_per_s, **({"peft": stats()} if stats else {}))
        self.restart_clock()

    def record(self, **metrics) -> None:
        """Append one record to metrics.jsonl (rank 0)."""
        if self.rt.master:
            record = {**metrics, "elapsed_s": self.elapsed()}
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({k: record.get(k) for k in METRICS} | {k: v for k, v in record.items()
                                                                           if k not in METRICS}) + "\n")

    def plot(self) -> str | None:
        """Redraw loss.png (rank 0); a note when that is not possible."""
        return plot_losses(self.out_dir) if self.rt.master else None


def forget_metrics_after(out_dir: Path, step: int) -> None:
    path = out_dir / "metrics.jsonl"
    if path.exists():
        kept = [line for line in path.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= step]
        path.write_text("".join(kept))


def plot_losses(out_dir: Path) -> str | None:
    """Draw loss.png from metrics.jsonl; returns a note when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no loss.png: matplotlib is not installed (pip install matplotlib)"
    path = out_dir / "metrics.jsonl"
    if not path.exists():  # stopped before the first log step: nothing to draw
        return None
    records = [json.loads(line) for line in open(path)]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "held-out")):
        points = [(r["step"], r[key]) for r in records if r[key] is not None]
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if key == "val_loss" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out_dir / "loss.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out_dir / "loss.png")
    return None
