"""Lab 6, the training loop: ``windows`` (inputs and next-token targets), ``get_lr`` (warm-up and cosine) and
``decays`` (which tensors weight decay applies to), against lab/fixtures/lab06.*."""

import numpy as np
import pytest
import torch

from lab.graders.check import LabFixtures, check
from llama_min.training.config import TrainConfig
from llama_min.training.data import windows
from llama_min.training.optim import decays, get_lr

LAB = LabFixtures(6)


def test_windows():
    """Four windows of 8 tokens from a stream of 60 (uint16, as the token files store them)."""
    case = LAB.case("windows")
    tokens = case["tokens"].numpy().astype(np.uint16)
    x, y = windows(tokens, case["starts"].numpy(), case.params["seq_len"])
    check((torch.as_tensor(np.asarray(x)), torch.as_tensor(np.asarray(y))), case,
          "windows(tokens (60,), starts [0, 7, 30, 51], seq_len=8) -> (inputs, targets)")


@pytest.mark.parametrize("name", ["warmup", "decay_steps"])
def test_get_lr(name):
    """The rate at every step of a short run (and 3 steps past its end)."""
    case = LAB.case(f"get_lr.{name}")
    fields = case.params["config"]
    cfg = TrainConfig(**fields)
    lrs = torch.tensor([float(get_lr(step, cfg)) for step in range(cfg.max_steps + 3)], dtype=torch.float64)
    settings = ", ".join(f"{k}={v}" for k, v in fields.items())
    check(lrs, case, f"[get_lr(step) for step in 0 … {cfg.max_steps + 2}] with {settings}")


def test_decays():
    case = LAB.case("decays")
    shapes = case.params["shapes"]
    chosen = torch.tensor([bool(decays(torch.empty(shape))) for shape in shapes.values()])
    check(chosen, case, "decays(p) for " + ", ".join(shapes))
