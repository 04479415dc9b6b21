"""A decode step compiled with torch.compile, and the one-row product that makes it fast on a CPU.

Decoding one token multiplies one activation row by every weight matrix, y = x Wᵀ with x (B, 1, in):
a matrix-vector product, whose speed is the speed of reading W from memory. On the CPUs we measured,
the BLAS kernel behind nn.Linear reads W for a single row at about half the memory bandwidth, and no
faster with two threads than with one (docs/performance.md). Written as a multiply and a sum,

    y = (x[..., None, :] * W).sum(-1)        (B, 1, 1, in) * (out, in) -> summed over in -> (B, 1, out)

the same product becomes, in torch.compile's CPU code, one vectorised loop over W shared among the
threads, and inside one compiled graph it reads the weights at close to the machine's bandwidth. Run
eagerly, that line would first build the whole (B, 1, out, in) product in memory, so ``OneRowLinear``
writes it this way only while being compiled, and is a plain nn.Linear everywhere else (training, the
prompt's prefill, eager generation).

    step, seconds = compile_decode_step(model)     # compiles now
    generate_stream(model, prompts, n, decode_step=step)

``tests/test_compiled_decode.py`` proves the compiled step gives the logits of the plain one.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from .generation import decode_step
from .model import Llama


class OneRowLinear(nn.Linear):
    """nn.Linear whose product with a single row is a multiply and a sum inside compiled code (see the
    module docstring). The same parameters under the same names: a state dict does not change."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., T, in_features) -> (..., T, out_features)."""
        if x.shape[-2] == 1 and torch.compiler.is_compiling():
            return (x.unsqueeze(-2) * self.weight).sum(-1)
        return super().forward(x)


def use_one_row_products(model: nn.Module) -> nn.Module:
    """Turn every plain nn.Linear of ``model`` into a OneRowLinear, in place; returns the model. Only the
    class changes: the parameters stay the same tensors (a tied output head stays tied). Quantised and
    PEFT layers, which are other classes, keep their own products."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneRowLinear
    return model


def compile_decode_step(model: Llama) -> tuple[Callable, float]:
    """``decode_step`` compiled for this model, and compiled now: (the compiled step, seconds it took).

    dynamic=True: one graph serves every cache position. The cache is allocated once at the model's full
    length, for one prompt at a time, and generate_stream reuses it (a cache sized per prompt would
    recompile). The warm-up writes one slot of the cache, which a prompt overwrites before reading it.
    On a CPU the plain linear layers become OneRowLinear first; CUDA's matrix-vector kernels already read
    at the memory's pace.
    """
    device = model.tok_embeddings.weight.device
    if device.type == "cpu":
        use_one_row_products(model)
    model.setup_cache(1, model.config.max_seq_len)
    compiled = torch.compile(decode_step, dynamic=True)
    start = time.perf_counter()
    with torch.no_grad():
        compiled(model, torch.zeros(1, dtype=torch.long, device=device), 2, None)  # 2: not a specialised 0 or 1
    return compiled, time.perf_counter() - start
