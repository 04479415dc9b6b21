"""A preallocated key/value cache for incremental decoding.

During generation every new token attends to the keys and values of all earlier tokens. Recomputing
them costs a full forward pass per token; keeping them costs memory. The cache is allocated once, at
the full length, and written in place at explicit positions, so decoding allocates nothing per token.
It holds the n_kv_heads key/value heads *unrepeated*: with grouped-query attention the repetition to
n_heads happens inside attention, so the cache is n_heads / n_kv_heads times smaller.

Every attention layer owns its cache module from construction; it holds nothing until ``allocate``
and again after ``release``. Only the buffers come and go, never the module: ``torch.compile`` guards
on a model's submodules, and a module attached for generation would recompile the training graph.
"""

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("k", None, persistent=False)  # (B, n_kv_heads, max_seq_len, head_dim) when allocated
        self.register_buffer("v", None, persistent=False)

    @property
    def active(self) -> bool:
        return self.k is not None

    def allocate(self, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def release(self) -> None:
        self.k = self.v = None

    def fits(self, batch_size: int, length: int, dtype: torch.dtype) -> bool:
        """Whether the allocated cache can serve a batch of this size up to ``length`` positions."""
        return self.active and self.k.shape[0] == batch_size and self.k.shape[2] >= length and self.k.dtype == dtype

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv_heads, T, head_dim) at positions start..start+T-1 and return the cache
        up to the last written position: two views of shape (B, n_kv_heads, start+T, head_dim)."""
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache overflow: writing positions {start}..{end - 1} but the cache "
                             f"holds {self.k.shape[2]}; set up the cache with a larger max_seq_len")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]
