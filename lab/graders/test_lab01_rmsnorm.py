"""Lab 1, RMSNorm: ``RMSNorm.forward`` against the reference outputs stored in lab/fixtures/lab01.*."""

import torch

from lab.graders.check import LabFixtures, check
from llama_min.rmsnorm import RMSNorm

LAB = LabFixtures(1)


def normalise(case_name: str):
    case = LAB.case(case_name)
    x, weight = case["x"], case["weight"]
    norm = RMSNorm(weight.shape[0], case.params["eps"]).to(weight.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        what = f"RMSNorm(dim={weight.shape[0]}, eps={case.params['eps']:g}) of x {tuple(x.shape)} {x.dtype}"
        return case, norm(x), what


def test_float32():
    """float32 input with a tiny and an all-zero vector among ordinary ones."""
    case, y, what = normalise("forward.float32")
    check(y, case, what)


def test_uses_its_own_eps():
    """A large eps (0.1) on small inputs: the module's eps, not a constant, goes under the square root."""
    case, y, what = normalise("forward.eps")
    check(y, case, what)


def test_bfloat16():
    """bfloat16 input and gain: statistics in float32, cast back, then the gain; output bfloat16."""
    case, y, what = normalise("forward.bfloat16")
    check(y, case, what)
