"""Rotary position embeddings, RoPE (Su et al. 2021, RoFormer, section 3.4.2, eq. 34).

Each head vector is cut into d/2 pairs; pair i at position m is rotated by the angle m·θ_i with
θ_i = theta^(-2i/d). A dot product of a rotated query at position m with a rotated key at position n
then depends on m and n only through m - n: attention sees relative positions.

Pairing: Meta's LLaMA rotates *adjacent* features (2i, 2i+1), which is what this file does. Hugging Face
rotates the two halves of the head instead and compensates by permuting the rows of wq and wk
(``hf_format.py`` undoes that permutation). Meta's code writes the rotation with complex numbers;
here it is written with real cos/sin tables, which every backend supports, and the tables are
non-persistent buffers: derived from the config, never stored in checkpoints.
"""

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.reset_tables()

    @torch.no_grad()
    def reset_tables(self) -> None:
        """(Re)compute the tables, in float32, on the buffers' device. Called at construction and
        after weights are loaded onto a model built on the meta device."""
        device = self.cos.device
        if device.type == "meta":
            return
        inv_freq = self.theta ** (-torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim)
        angles = torch.outer(torch.arange(self.max_seq_len, device=device).float(), inv_freq)  # (T, d/2)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (T,) or (B, T) integer positions -> cos, sin: (T, d/2) or (B, T, d/2), float32."""
        return self.cos[positions], self.sin[positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent feature pairs of x by the angles whose cos/sin are given.

    x: (B, T, H, d); cos, sin: (T, d/2) or (B, T, d/2). Returns (B, T, H, d) in x's dtype; the rotation
    itself runs in float32, as in Meta's reference code.
    """
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads: (.., T, 1, d/2)
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, H, d/2, 2): features (2i, 2i+1)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)
