"""LLaMA-Adapter (Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with
Zero-init Attention", section 3).

The top L layers each get K learnable *adaptation prompts* P (K, dim) (section 3.1). In those layers the
tokens' queries attend to the prompts as extra keys/values, made by the layer's own frozen wk and wv
(no rotary embedding: the prompts have no position), but with a softmax of their own, scaled by a
learnable gate g that starts at zero (section 3.2, zero-initialised attention):

    S_p = softmax(q P_kᵀ / sqrt(d))            (B, H, T, K)   scores over the prompts
    out = attention over the tokens  +  g · S_p P_v

          q ─┬─► causal attention over tokens (unchanged) ──────────┐
             │                                                      (+) ──► heads' output
             └─► softmax(q · wk(P)ᵀ / sqrt(d)) · wv(P) ─► × gate ───┘

One gate per head, shape (1, n_heads, 1, 1). Because it starts at zero the adapted model is *exactly*
the base model before training, and the first step's gradient reaches only the gates (the prompts'
gradient is multiplied by g = 0); the prompts start learning once the gates open.

The paper (section 3.2) multiplies by g itself; the official training code multiplies by tanh(g),
which keeps every head's gate factor within (-1, 1). Both are here: ``gate_tanh=False`` (the default,
the paper) and ``gate_tanh=True`` (the official code). tanh'(0) = 1, so the two start alike.

Grouped-query attention: the prompt keys/values come out of wk/wv with n_kv_heads heads and are repeated
to n_heads, exactly like the tokens' keys/values (query head h reads kv head h // (n_heads / n_kv_heads)).

Layers below the adapted ones build no autograd graph: apply_peft freezes every base tensor, and autograd
records an operation only when one of its inputs requires a gradient. Below the first adapted layer no
input does (the embedding is frozen), so nothing there is recorded and no activation is kept for the
backward pass; tests/test_peft.py proves it by watching what autograd saves.

Multimodal (section 4.3 of v1, "Multi-modal Reasoning"): a frozen image encoder gives each example a
global feature I (B, C_v), M scales concatenated along the channels. A learnable projection maps it to
the model width, I_p = Projection(I) (B, dim), which is repeated over the K prompt positions and added
element-wise to the prompts of *every* adapted layer:  P_b = P + I_p[b]  (B, K, dim). The paper leaves
the network open ("a learnable projection network"); ``VisualProjection`` is a linear layer (or, with a
hidden width, two with a SiLU between them) followed by LayerNorm, so that I_p has the unit scale of
the N(0, 1) prompts it is added to, as the official v2 code's clip_proj + clip_proj_norm do. One
projection serves all layers (the paper's single I_p). The image enters the gated branch only, so with
zero gates the model is still exactly the base, with or without images; without an image the prompts
are P alone (text-only use of a multimodal adapter).

The prompt keys and values are computed at every call, also while generating, where they do not change
from one token to the next: K rows through two projections whose weights each decode step reads anyway,
against a cache that would have to notice every way P or wk/wv can change (an optimiser step, a load, a
LoRA merge, an assignment to ``.data``) and that ``torch.compile`` would have to trace.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class AdapterPrompt(nn.Module):
    def __init__(self, adapter_len: int, dim: int, n_heads: int, n_kv_heads: int, gate_tanh: bool,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.gate_tanh = gate_tanh
        # N(0, 1): wk/wv of a pre-norm block normally see RMS-normalised inputs, whose entries have
        # unit scale; prompts of the same scale give keys and values of the usual size.
        self.prompt = nn.Parameter(torch.randn(adapter_len, dim, device=device, dtype=dtype))  # P (K, dim)
        self.gate = nn.Parameter(torch.zeros(1, n_heads, 1, 1, device=device, dtype=dtype))  # g, one per head

    def prompt_kv(self, wk: nn.Module, wv: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompts through the frozen projections, heads repeated for GQA: two (1, H, K, d)."""
        K, groups = self.prompt.shape[0], self.n_heads // self.n_kv_heads
        k = wk(self.prompt).view(K, self.n_kv_heads, self.head_dim).transpose(0, 1)  # (H_kv, K, d), no rotary
        v = wv(self.prompt).view(K, self.n_kv_heads, self.head_dim).transpose(0, 1)
        k = k.repeat_interleave(groups, dim=0)[None]  # (1, H, K, d)
        v = v.repeat_interleave(groups, dim=0)[None]
        return k, v

    def add_image(self, k: torch.Tensor, v: torch.Tensor, wk: nn.Module, wv: nn.Module,
                  visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompts' keys and values k, v (1, H, K, d) (``prompt_kv``) with the projected image visual
        (B, dim) added to every one of the K prompts: the keys and values of P + I_p, two (B, H, K, d).
        wk and wv are linear without bias, so wk(P + I_p) = wk(P) + wk(I_p): the image goes through them
        once per example (B rows instead of B·K) and is broadcast over the K prompt positions."""
        B, groups = visual.shape[0], self.n_heads // self.n_kv_heads
        vk = wk(visual).view(B, self.n_kv_heads, 1, self.head_dim).repeat_interleave(groups, dim=1)  # (B, H, 1, d)
        vv = wv(visual).view(B, self.n_kv_heads, 1, self.head_dim).repeat_interleave(groups, dim=1)
        return k + vk, v + vv  # (B, H, K, d)

    def forward(self, q: torch.Tensor, wk: nn.Module, wv: nn.Module, visual: torch.Tensor | None = None) -> torch.Tensor:
        """q: (B, H, T, d) the layer's queries after rotary; wk, wv: the layer's frozen projections;
        visual: (B, dim) the projected image features, or None (text only).
        Returns the gated prompt attention (B, H, T, d), to be added to the heads' output."""
        k, v = self.prompt_kv(wk, wv)  # (1, H, K, d)
        if visual is not None:
            k, v = self.add_image(k, v, wk, wv, visual)  # (B, H, K, d): the prompts P + I_p
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, T, K)
        weights = F.softmax(scores.float(), dim=-1).type_as(q)  # its own softmax, over the prompts only
        gate = torch.tanh(self.gate) if self.gate_tanh else self.gate
        return gate * (weights @ v)  # (B, H, T, d)

    def extra_repr(self) -> str:
        return f"adapter_len={self.prompt.shape[0]}, dim={self.prompt.shape[1]}, gate_tanh={self.gate_tanh}"


class VisualProjection(nn.Module):
    """The multimodal adapter's learnable projection (section 4.3): image features (B, C_v), M scales
    concatenated, to the model width (B, dim). Linear (or Linear, SiLU, Linear with ``hidden`` > 0),
    then LayerNorm. Shared by every adapted layer; its output is added to their prompts."""

    def __init__(self, in_dim: int, dim: int, hidden: int = 0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        if hidden:
            self.net = nn.Sequential(nn.Linear(in_dim, hidden, **factory), nn.SiLU(), nn.Linear(hidden, dim, **factory))
        else:
            self.net = nn.Linear(in_dim, dim, **factory)
        self.norm = nn.LayerNorm(dim, **factory)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: (B, C_v) -> (B, dim)."""
        return self.norm(self.net(features.to(self.norm.weight.dtype)))
