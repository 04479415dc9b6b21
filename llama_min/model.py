"""The LLaMA decoder (Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models", section 2.2).

    tokens -> embedding -> n_layers x Block -> RMSNorm -> output head -> logits

A GPT-style decoder-only transformer with three changes, each in its own file: pre-normalisation with
RMSNorm (rmsnorm.py), the SwiGLU feed-forward (feedforward.py) and rotary position embeddings
(rope.py); grouped-query attention (attention.py) arrived with Llama 2. Parameter names are Meta's
state-dict keys, so Meta checkpoints load as they are.

This file knows nothing about devices, files or training: the caller chooses device and dtype (``with
torch.device(...)``, ``.to(...)``); checkpoint.py loads and saves a model directory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention_mask
from .block import Block
from .chunked_loss import IGNORE_INDEX, chunked_head_loss
from .config import ModelConfig
from .rmsnorm import RMSNorm
from .rope import RotaryEmbedding


class Llama(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.init_weights()
        # The multimodal LLaMA-Adapter (llama_min/peft/adapter.py) installs its projection here: image
        # features (B, C_v) -> (B, dim), added to every adapted layer's prompts. None in the base model.
        self.visual_proj: nn.Module | None = None
        # What llama_min.peft.apply_peft records when it adapts the model (all None for the base): the method's
        # PeftConfig, a fingerprint of the base weights it was applied to (adapter files record it), and the
        # base's norm gains when the method trains them (remove_peft restores them).
        self.peft_config = self.peft_base_fingerprint = self.peft_base_norms = None

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialisation for training from scratch (GPT-2 section 2.3, as in nanoGPT and llama2.c).

        Every matrix ~ N(0, 0.02²); norm gains 1. The two projections that write into the residual
        stream, attention.wo and feed_forward.w2, get std 0.02 / sqrt(2·n_layers): each block adds two
        such outputs, so the residual stream's variance stays independent of depth.
        """
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=residual_std)
            else:
                nn.init.normal_(p, mean=0.0, std=0.02)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *, start_pos: int = 0,
                pad_lens: torch.Tensor | None = None, last_only: bool = False, images: torch.Tensor | None = None):
        """Run the model.

        tokens: (B, T) int64 token ids.
        targets: (B, T) next-token ids, IGNORE_INDEX where a position does not count; optional.
        start_pos: cache slot of tokens[:, 0]; non-zero only with a KV cache (see setup_cache).
        pad_lens: (B,) number of left-padding tokens per row, for batches of prompts of different
            lengths; row b's first real token gets rotary position 0 and padding is never attended to.
        last_only: compute logits for the last position only (all generation needs).
        images: (B, C_v) one image's features per row, for a multimodal LLaMA-Adapter (visual_proj).
        Returns (logits, loss): logits float32 (B, T, vocab_size), or (B, 1, vocab_size) with last_only;
        loss the mean cross-entropy over counted positions, or None without targets. In training mode
        with targets, logits is None: the loss is computed a chunk of positions at a time without ever
        holding them (chunked_loss.py; the same loss and gradients as the plain lines below).
        """
        B, T = tokens.shape
        if start_pos + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} positions exceeds max_seq_len "
                             f"{self.config.max_seq_len} of this model")
        if start_pos and not self.layers[0].attention.cache.active:
            raise ValueError("start_pos > 0 needs a KV cache holding the earlier positions: call setup_cache first")

        slots = torch.arange(start_pos, start_pos + T, device=tokens.device)  # (T,)
        positions = slots if pad_lens is None else (slots[None] - pad_lens[:, None]).clamp(min=0)  # (T,)|(B, T)
        cos, sin = self.rope(positions)
        # No explicit mask where causality is all there is (attention aligns it, and the kernels have a
        # fast causal path); left padding must also be hidden from every query.
        mask = None if pad_lens is None else attention_mask(start_pos, T, pad_lens, tokens.device)

        visual = None
        if images is not None:
            if self.visual_proj is None:
                raise ValueError("images were given, but this model has no visual projection: apply a multimodal "
                                 "adapter (PeftConfig(method='adapter', visual_dim=C_v)) or load one")
            visual = self.visual_proj(images)  # (B, dim), added to the adapter prompts of every adapted layer

        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, start_pos, visual)
        if last_only:
            h = h[:, -1:]  # (B, 1, dim): skip the output head's work for positions nobody reads
        h = self.norm(h)
        if targets is not None and self.training and type(self.output) is nn.Linear:
            return None, chunked_head_loss(h, self.output.weight, targets)
        logits = self.output(h).float()  # (B, T, vocab_size)

        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss

    # ---- KV cache for generation ------------------------------------------------------------------

    def setup_cache(self, batch_size: int, max_seq_len: int | None = None, dtype: torch.dtype | None = None) -> None:
        """Allocate every layer's KV cache on the weights' device, in the dtype the keys will have
        (``cache_dtype``), for up to ``max_seq_len`` positions (default: the model's)."""
        max_seq_len = max_seq_len or self.config.max_seq_len
        if max_seq_len > self.config.max_seq_len:
            raise ValueError(f"cache length {max_seq_len} exceeds the model's max_seq_len {self.config.max_seq_len}")
        for layer in self.layers:
            layer.attention.cache.allocate(batch_size, self.config.n_kv_heads, max_seq_len, self.config.head_dim,
                                           dtype or self.cache_dtype(), self.tok_embeddings.weight.device)

    def cache_dtype(self) -> torch.dtype:
        """The dtype keys are computed in: the autocast dtype when autocast is on, else the weights'."""
        device = self.tok_embeddings.weight.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.tok_embeddings.weight.dtype

    def cache_fits(self, batch_size: int, length: int) -> bool:
        """Whether the allocated caches already serve this batch size up to ``length`` positions."""
        return all(layer.attention.cache.fits(batch_size, length, self.cache_dtype()) for layer in self.layers)

    def drop_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache.release()
