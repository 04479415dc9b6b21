"""The training loop, from the pieces of this sub-package: per step, set the learning rate, run every
micro-batch forward and backward, clip the gradient, take the optimiser step, clear the gradients.

A step's micro-batches (gradient accumulation) together stand for one large batch, so the step's loss is the
mean over *all* their counted targets: each micro-batch's mean loss is weighted by its share of those targets
before backward. That makes the gradient the same as one large batch's, also when micro-batches count
different numbers of targets (prompt tokens and padding are not counted). train.py does the same
(``count_targets``); tests/test_from_scratch.py checks that this loop reproduces its losses.
"""

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..model import IGNORE_INDEX
from .clip import clip_grad_norm
from .cross_entropy import cross_entropy


def train(model: nn.Module, steps: Iterable[list[tuple[torch.Tensor, torch.Tensor]]], optimizer: torch.optim.Optimizer,
          lr_at: Callable[[int], float], grad_clip: float = 1.0) -> list[float]:
    """Train ``model`` for one optimiser step per item of ``steps``, a list of micro-batches (x, y): inputs and
    targets, (B, T) int64 each, y IGNORE_INDEX where a position does not count. ``model(x)`` returns a tuple
    whose first item is the logits (B, T, V), as Llama does. Step s (from 0) uses the learning rate lr_at(s)
    for every parameter group. grad_clip > 0 caps the global gradient norm before each step.
    Returns each step's loss: the mean cross-entropy over all the step's counted targets, as Python floats."""
    losses = []
    for step, batches in enumerate(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        n_targets = sum(int((y != IGNORE_INDEX).sum()) for _, y in batches)
        step_loss = 0.0
        for x, y in batches:
            logits = model(x)[0]  # (B, T, V)
            share = int((y != IGNORE_INDEX).sum()) / n_targets  # this micro-batch's part of the step's mean
            loss = cross_entropy(logits.flatten(0, 1), y.flatten(), IGNORE_INDEX) * share
            loss.backward()  # gradients add up over the micro-batches
            step_loss += loss.item()
        if grad_clip > 0:
            clip_grad_norm(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
    return losses
