"""RMSNorm (Zhang & Sennrich 2019, eq. 4), the normalisation LLaMA applies before every sub-layer.

    y = x / sqrt(mean(x²) + eps) · g

No mean subtraction and no bias, unlike LayerNorm. Eq. 4 has no eps; the small constant under the root,
which keeps an all-zero input from dividing by zero, comes from Meta's code (1e-6 in LLaMA-1, 1e-5 in
Llama 2: ``ModelConfig.norm_eps``). The statistics are computed in float32 whatever the
input dtype, because mean(x²) over thousands of bfloat16 values loses most of its precision; the result
is cast back to the input dtype *before* the gain is applied, as in Meta's reference code.
"""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # the gain g, one per feature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) -> (..., dim), same dtype as x."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
