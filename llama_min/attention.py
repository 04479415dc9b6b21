"""Causal self-attention with grouped-query heads and an optional KV cache.

Scaled dot-product attention (Vaswani et al. 2017, eq. 1):  softmax(q kᵀ / sqrt(d) + mask) v.
Grouped-query attention (Ainslie et al. 2023, GQA, section 2.2): n_heads query heads share n_kv_heads
key/value heads; query head h reads kv head h // (n_heads // n_kv_heads). n_kv_heads = n_heads is
ordinary multi-head attention (LLaMA-1, Llama 2 7B/13B); Llama 2 70B uses 8 kv heads.

Two formulations of the same function live side by side: ``plain_attention`` writes out the scores,
the mask and the softmax for the reader; ``sdpa_attention`` calls PyTorch's fused kernel for speed.
``tests/test_attention.py`` proves they agree.

The mask is boolean, True where a query may attend to a key. With a cache the queries are the *last*
T of S positions, so the causal triangle sits at the bottom right of the (T, S) score matrix; see
``attention_mask``.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kv_cache import KVCache
from .rope import apply_rotary


def attention_mask(start: int, seq_len: int, pad_lens: torch.Tensor | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Which keys each query may see, for queries at cache slots start..start+seq_len-1.

    Key slot j is visible to the query in slot i when j <= i (causality) and j is not left padding
    (j >= pad_lens[b]). A padding query sees itself only, so that no softmax row is empty (an empty
    row gives NaN); its output is never used.
    Returns bool (B, 1, T, S) with S = start + seq_len, or (1, 1, T, S) without padding.
    """
    q_slots = torch.arange(start, start + seq_len, device=device)[:, None]  # (T, 1)
    k_slots = torch.arange(start + seq_len, device=device)[None, :]  # (1, S)
    mask = (k_slots <= q_slots)[None, None]  # (1, 1, T, S)
    if pad_lens is not None:
        not_pad = k_slots >= pad_lens.to(device)[:, None, None, None]  # (B, 1, 1, S)
        mask = (mask & not_pad) | (k_slots == q_slots)
    return mask


def causal_mask(T: int, S: int, device: torch.device | str | None = None) -> torch.Tensor:
    """bool (T, S): the causal triangle aligned bottom-right, for T queries that are the last T of S
    positions (query i sees keys j <= i + S - T)."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The formula written out. q: (B, H, T, d); k, v: (B, H_kv, S, d); mask: bool broadcastable to
    (B, 1, T, S), or None for the causal mask aligned bottom-right. Returns (B, H, T, d)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (B, H, S, d): kv head h // groups serves query head h
    v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if mask is None:
        mask = causal_mask(*scores.shape[-2:], device=q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = F.softmax(scores.float(), dim=-1).type_as(q)  # softmax in float32, as Meta's code does
    return weights @ v  # (B, H, T, d)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The same function through PyTorch's fused kernel. The kernel's ``is_causal`` aligns the triangle
    top-left, which is the bottom-right one only for a square (T == S: training, or prefill into an empty
    cache); fewer queries than keys (after a filled cache) get the explicit mask, and one query sees every
    key. Kv heads are broadcast inside the kernel (``enable_gqa``) where it can, else copied first."""
    T, S = q.shape[2], k.shape[2]
    if q.shape[1] != k.shape[1] and not kernel_broadcasts_kv_heads(q, mask):
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    gqa = q.shape[1] != k.shape[1]
    if mask is None and T == S and T > 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if mask is None and T > 1:
        mask = causal_mask(T, S, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def kernel_broadcasts_kv_heads(q: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether SDPA can take grouped kv heads as they are (``enable_gqa``) without losing its fast path.
    On the CPU it can. On CUDA only the flash kernel takes them, and flash runs in half precision without
    an explicit mask; otherwise PyTorch would fall back to its slow math kernel, so the kv heads are
    repeated first and the memory-efficient kernel runs instead."""
    return q.device.type != "cuda" or (mask is None and q.dtype in (torch.float16, torch.bfloat16))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)
        self.attend = sdpa_attention if config.attn_impl == "sdpa" else plain_attention
        self.cache = KVCache()  # empty until Llama.setup_cache allocates it for generation
        # LLaMA-Adapter (llama_min/peft/adapter.py) installs a module here: it adds gated attention over
        # learned prompts to the output of the heads. None in the base model.
        self.prompt_adapter: nn.Module | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, start: int = 0, visual: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, dim); cos, sin: rotary tables at the tokens' positions, (T, d/2) or (B, T, d/2);
        mask: bool (B|1, 1, T, S) or None for causal (aligned bottom-right when a cache holds earlier
        positions); start: cache slot of the first token; visual: (B, dim) projected image features for
        the prompt adapter (multimodal LLaMA-Adapter), or None.
        Returns (B, T, dim)."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, d)
        if self.cache.active:
            k, v = self.cache.update(start, k, v)  # (B, n_kv_heads, start+T, d)
        y = self.attend(q, k, v, mask)  # (B, H, T, d)
        if self.prompt_adapter is not None:
            y = y + self.prompt_adapter(q, self.wk, self.wv, visual)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, H·d) -> (B, T, dim)
