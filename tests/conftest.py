"""Shared fixtures: small configurations and models that run in milliseconds on a CPU.

``tiny_config`` builds a grouped-query configuration (4 query heads sharing 2 kv heads) small enough
for exact comparisons; ``random_model`` gives it weights large enough that attention is far from
uniform, so a wrong mask, position or head mapping moves the logits by much more than any tolerance.
"""

import math

import pytest
import torch

from llama_min import Llama, ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    """A small GQA config: dim 64, 4 heads of 16 features, 2 kv heads, 2 layers, vocab 97."""
    fields = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16,
                  norm_eps=1e-5, rope_theta=10000.0, max_seq_len=64)
    fields.update(overrides)
    return ModelConfig(**fields)


@torch.no_grad()
def random_model(config: ModelConfig, seed: int = 0) -> Llama:
    """A Llama in eval mode with O(1) activations: embeddings ~ N(0, 1), every matrix ~ N(0, 1/fan_in),
    norm gains ~ U(0.5, 1.5). The training initialisation (std 0.02) makes attention nearly uniform,
    which would hide mistakes in masking and positions."""
    torch.manual_seed(seed)
    model = Llama(config)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.uniform_(0.5, 1.5)
        elif name == "tok_embeddings.weight":
            p.normal_(0.0, 1.0)
        else:
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
    return model.eval()


def random_tokens(config: ModelConfig, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    """(batch, length) int64 token ids drawn with their own generator, independent of the model's."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length), generator=g)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, so failures reproduce."""
    torch.manual_seed(0)
