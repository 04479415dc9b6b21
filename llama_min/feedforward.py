"""SwiGLU feed-forward network (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6; LLaMA 2.2).

    FFN(x) = w2( silu(w1 x) ⊙ w3 x )

w1 is the gated branch, w3 the linear branch, w2 projects back to the model width. No biases. The
hidden size is ``ModelConfig.hidden_dim``.
"""

import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, dim) -> (B, T, dim)."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
