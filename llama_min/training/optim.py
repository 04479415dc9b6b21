"""The optimiser and its learning-rate schedule.

AdamW (Loshchilov & Hutter 2019) with LLaMA's betas (section 2.3), weight decay on matrices only, and a
linear warm-up followed by a cosine decay to a tenth of the peak (LLaMA section 2.3).
"""

from __future__ import annotations

import math

import torch

from .config import TrainConfig
from .runtime import Runtime


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to the peak, then cosine decay to min_lr_ratio·peak (as in the LLaMA paper,
    section 2.3: 2000 warm-up steps, final rate 10% of the peak), constant after the decay ends."""
    decay_steps = cfg.decay_steps or cfg.max_steps
    min_lr = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def decays(p: torch.Tensor) -> bool:
    """Whether weight decay applies: to the weight matrices (2-D) and nothing else.

    Base model: the projections, the embedding and the output head; not the RMSNorm gains (vectors:
    decay would only fight the normalisation). PEFT tensors: LoRA's A and B, the adapter prompts and the
    bottleneck projections are matrices and are decayed, which pulls the adapted model gently back
    toward the base (B A → 0); the bottleneck biases are vectors and are not. LLaMA-Adapter's gate is
    (1, H, 1, 1), 4-D only so that it broadcasts over (B, H, T, d): one scalar per head, the amount of
    prompt attention let in (section 3.2); decay would pull every head back toward the closed gate the
    method starts from, a prior against adapting at all on the very tensor that decides how much.
    """
    return p.dim() == 2


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, rt: Runtime) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (``decays``). Frozen parameters never reach the
    optimiser, so they cost no optimiser state."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if decays(p)], "weight_decay": cfg.weight_decay},
        {"params": [p for p in trainable if not decays(p)], "weight_decay": 0.0},
    ]
    # fused: one kernel for all tensors on GPU. PyTorch's fused CPU AdamW is faster too, but it rounds
    # differently from the for-each update by an ulp, which would move every published CPU figure.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=rt.device.type == "cuda")
