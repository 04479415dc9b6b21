"""One transformer block, pre-norm (LLaMA section 2.2, following GPT-3):

    h   = x + Attention(RMSNorm(x))
    out = h + FeedForward(RMSNorm(h))

Normalising the input of each sub-layer rather than its output keeps the residual stream an
untouched sum, which is what makes deep stacks train stably.
"""

import torch
from torch import nn

from .attention import Attention
from .config import ModelConfig
from .feedforward import FeedForward
from .rmsnorm import RMSNorm


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.hidden_dim)
        # Bottleneck adapters (llama_min/peft/bottleneck.py) install modules here: each maps a sub-layer's
        # output (B, T, dim) to itself plus a small residual correction. None in the base model.
        self.attention_adapter: nn.Module | None = None
        self.ffn_adapter: nn.Module | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, start: int = 0, visual: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, dim) -> (B, T, dim); the other arguments are passed to Attention."""
        a = self.attention(self.attention_norm(x), cos, sin, mask, start, visual)
        if self.attention_adapter is not None:
            a = self.attention_adapter(a)
        h = x + a
        f = self.feed_forward(self.ffn_norm(h))
        if self.ffn_adapter is not None:
            f = self.ffn_adapter(f)
        return h + f
