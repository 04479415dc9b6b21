"""LoRA: low-rank adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen projection W (out, in) is adapted by a trainable low-rank product (section 4.1):

    h = W x + (alpha / r) · B A x          A: (r, in), B: (out, r), r << min(in, out)

          x ──► W (frozen) ────────────────┐
          │                                 (+) ──► h
          └─► dropout ─► A ─► B ─► ·alpha/r ┘

B starts at zeros, so B A = 0 and the adapted layer starts as exactly the frozen one. A is initialised
like an ``nn.Linear`` weight (Kaiming-uniform), as Microsoft's loralib and Hugging Face PEFT do; the
paper's section 4.1 draws A from a Gaussian instead. Either way only B receives gradient at the first step
(A's gradient is Bᵀ(...) = 0); with train.py's AdamW, A still shrinks at that step by its decoupled weight
decay, lr·wd (training/optim.py, ``decays``, says which tensors are decayed and why). Dividing by r (the
alpha / r scale) keeps the size of the update roughly independent of the rank, so alpha need not be
re-tuned when r changes (section 4.1).

Because B A has W's shape, it can be folded into W for inference (section 4.1, "No additional
inference latency"): ``merge`` adds it, ``unmerge`` subtracts it. Both are explicit and idempotent;
nothing happens behind ``.train()`` or ``.eval()``. While merged, the forward skips the low-rank path
(and its dropout), so A and B receive no gradient: train unmerged.

``LoRALinear`` *holds* the frozen weight Parameter under the name ``weight``, so in the state dict the
base tensor keeps its key (``layers.0.attention.wq.weight``) and base checkpoints load unchanged; the
new tensors are ``...wq.lora_a`` and ``...wq.lora_b``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        """Wrap ``base`` (no bias, as every LLaMA projection): its weight Parameter is shared, not
        copied, so a tied output head stays tied. The new tensors take the weight's device and dtype."""
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRALinear wraps bias-free projections only (LLaMA has no biases)")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        self.weight = base.weight  # the frozen W (out, in), under its original state-dict name
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, **factory))  # A (r, in)
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, **factory))  # B (out, r)
        # The same initialisation nn.Linear gives its weight (Kaiming-uniform with a = sqrt(5)).
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) · B A, shape (out, in), in float32 (the product of two low-precision matrices
        is rounded once, when it is added to W)."""
        return self.scale * (self.lora_b.float() @ self.lora_a.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out)."""
        y = F.linear(x, self.weight)
        if self.merged:  # B A is already inside W
            return y
        # Two thin matmuls, x A^T then B^T: never forms the (out, in) product during training.
        return y + F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + (alpha / r) B A, once; the forward then skips the low-rank path."""
        if not self.merged:
            self.weight.copy_(self.weight.float() + self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - (alpha / r) B A, once: undoes ``merge`` up to floating-point rounding."""
        if self.merged:
            self.weight.copy_(self.weight.float() - self.delta_weight())
            self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, merged={self.merged}")
