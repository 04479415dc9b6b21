"""NEFTune: uniform noise on the input embeddings while fine-tuning (Jain et al. 2023, "NEFTune: Noisy
Embeddings Improve Instruction Finetuning", Algorithm 1).

During training only, every embedding vector gets independent uniform noise:

    X_emb + (alpha / sqrt(T · dim)) · eps,    eps ~ Uniform(-1, 1)^(B, T, dim)

T is the sequence length of the batch (padding included, as in the paper's code) and dim the width
of the embedding. The scale makes the noise's total norm roughly constant whatever T and dim:
each entry has variance scale² / 3, so the (T, dim) noise of one sequence has norm ≈ alpha / sqrt(3).
The paper uses alpha in {5, 10, 15}. In evaluation mode (``model.eval()``) the layer is exactly
``nn.Embedding``: generation and evaluation are noise-free. Noise is drawn from torch's global
generator, so ``torch.manual_seed`` makes it reproducible.

The noisy layer replaces ``model.tok_embeddings`` and holds the *same* ``weight`` Parameter object, so
the state-dict key ``tok_embeddings.weight`` is unchanged (checkpoints load and save as before) and,
with ``tie_embeddings``, ``model.output.weight is model.tok_embeddings.weight`` still holds: the tied
head and the embedding keep receiving gradient into one tensor.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class NoisyEmbedding(nn.Embedding):
    """An nn.Embedding that adds NEFTune noise to its output in training mode.

    Built from an existing embedding with ``NoisyEmbedding.wrap(embedding, alpha)``, sharing its weight.
    """

    alpha: float

    @classmethod
    def wrap(cls, embedding: nn.Embedding, alpha: float) -> "NoisyEmbedding":
        # Construct on the meta device (no memory, no init), then share the existing Parameter.
        noisy = cls(embedding.num_embeddings, embedding.embedding_dim, padding_idx=embedding.padding_idx,
                    max_norm=embedding.max_norm, norm_type=embedding.norm_type,
                    scale_grad_by_freq=embedding.scale_grad_by_freq, sparse=embedding.sparse, device="meta")
        noisy.weight = embedding.weight
        noisy.alpha = _checked_alpha(alpha)
        return noisy.train(embedding.training)  # keep the mode of the module it replaces

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, T) int64 -> (B, T, dim) embeddings, noisy in training mode."""
        x = super().forward(tokens)
        if not self.training or self.alpha == 0:
            return x
        scale = self.alpha / math.sqrt(x.shape[-2] * x.shape[-1])  # alpha / sqrt(T · dim)
        return x + scale * (torch.rand_like(x) * 2 - 1)  # uniform in [-scale, scale]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", alpha={self.alpha}"


def _checked_alpha(alpha: float) -> float:
    if not alpha >= 0:  # also refuses NaN
        raise ValueError(f"NEFTune alpha must be >= 0, got {alpha}; the paper uses 5, 10 or 15 (0 disables the noise)")
    return float(alpha)


def add_embedding_noise(model: nn.Module, alpha: float) -> nn.Module:
    """Replace ``model.tok_embeddings`` by a NoisyEmbedding sharing its weight (``--embed_noise alpha``).
    Calling it again changes alpha. Returns the model."""
    current = model.tok_embeddings
    if isinstance(current, NoisyEmbedding):
        current.alpha = _checked_alpha(alpha)
    else:
        model.tok_embeddings = NoisyEmbedding.wrap(current, alpha)
    return model
