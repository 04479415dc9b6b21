"""Rotary position embeddings, RoPE (Su et al. 2021, RoFormer, section 3.4.2, eq. 34).

Each head vector is cut into d/2 pairs; pair i at position m is rotated by the angle m·θ_i with
θ_i = theta^(-2i/d), i = 0 … d/2 − 1 (the paper counts i from 1, θ_i = 10000^(−2(i−1)/d); the
frequencies are the same). A dot product of a rotated query at position m with a rotated key at
position n then depends on m and n only through m - n: attention sees relative positions.

Pairing: Meta's LLaMA rotates *adjacent* features (2i, 2i+1), which is what this file does. Hugging Face
rotates the two halves of the head instead and compensates by permuting the rows of wq and wk
(``hf_format.py`` undoes that permutation). Meta's code writes the rotation with complex
numbers; here it is written with real cos/sin, which every backend supports.

Long-context models rescale the frequencies θ_i before use (``ModelConfig.rope_scaling``):
``scaled_frequencies`` below.

The angles are computed for the positions asked, in float32, at every call: a few small operations
next to the model's matrix products, and no table that ``model.to(torch.bfloat16)`` could round
(bfloat16 keeps 8 bits of an angle's cosine: |Δcos| ≈ 2e-3) or that must follow the model's device.
"""

import math

import torch
from torch import nn

from .config import RopeScaling


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None = None):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """θ_i = theta^(-2i/d) for i = 0 … d/2 − 1, scaled if the model says so: (d/2,) float32."""
        inv_freq = self.theta ** (-torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim)
        return inv_freq if self.scaling is None else scaled_frequencies(inv_freq, self.scaling)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (T,) or (B, T) integer positions -> cos, sin: (T, d/2) or (B, T, d/2), float32."""
        angles = positions.float()[..., None] * self.inv_freq(positions.device)  # m·θ_i
        return angles.cos(), angles.sin()

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}" + (f", scaling={self.scaling}" if self.scaling else "")


def scaled_frequencies(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """The frequencies θ_i (d/2,) of a model pretrained on short contexts, adapted to longer ones.

    linear (position interpolation, Chen et al. 2023, "Extending Context Window of Large Language Models
    via Positional Interpolation", eq. 3): θ_i / factor, so positions up to factor·L look like 0…L.

    llama3 (Meta's Llama 3.1 release, the ``use_scaled_rope`` rule of its reference code; the same rule
    as ``rope_type: llama3`` in Hugging Face configs): with wavelength λ_i = 2π / θ_i and the pretraining
    context L = original_max_seq_len,
        λ_i > L / low_freq_factor    θ_i / factor                  (slow rotations: interpolated)
        λ_i < L / high_freq_factor   θ_i                           (fast rotations: kept)
        otherwise                    (1 − s)·θ_i / factor + s·θ_i, s = (L / λ_i − low) / (high − low)
    s runs from 0 to 1 across the middle band, so the rule is continuous.
    """
    if s.kind == "linear":
        return inv_freq / s.factor
    wavelength = 2 * math.pi / inv_freq
    context = s.original_max_seq_len
    blend = (context / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    middle = (1 - blend) * inv_freq / s.factor + blend * inv_freq
    return torch.where(wavelength > context / s.low_freq_factor, inv_freq / s.factor,
                       torch.where(wavelength < context / s.high_freq_factor, inv_freq, middle))


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
