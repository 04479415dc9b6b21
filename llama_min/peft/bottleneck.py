"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", section 2.1,
figure 2).

A small module inserted twice per block: after the attention's output projection and after the
feed-forward, before each is added to the residual stream. It projects the sub-layer's output down to
a few features, applies a non-linearity, projects back up, and adds the result to its own input:

    adapter(a) = a + up(silu(down(a)))        down: dim -> bottleneck_dim, up: bottleneck_dim -> dim

          a ──┬──────────────────────────────────┐
              └─► down ─► silu ─► up (zeros) ───(+) ──► residual add of the block

The paper leaves the non-linearity open; SiLU is the one LLaMA's feed-forward already uses. It
initialises the adapter near the identity; here the up-projection (weight and bias) starts at exactly
zero, so the adapter *is* the identity and the adapted model equals the base model before training.
Houlsby et al. also train the layer norms (section 2.1); ``PeftConfig.train_norms`` does the
same with the RMSNorm gains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Bottleneck(nn.Module):
    def __init__(self, dim: int, bottleneck_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck_dim, device=device, dtype=dtype)  # nn.Linear's own init
        self.up = nn.Linear(bottleneck_dim, dim, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """a: a sub-layer's output (B, T, dim) -> (B, T, dim)."""
        return a + self.up(F.silu(self.down(a)))
