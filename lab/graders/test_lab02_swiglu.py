"""Lab 2, SwiGLU: ``FeedForward.forward`` against the reference outputs stored in lab/fixtures/lab02.*."""

import torch

from lab.graders.check import LabFixtures, check
from llama_min.feedforward import FeedForward

LAB = LabFixtures(2)


def test_forward():
    """FFN(x) = w2(silu(w1 x) * w3 x) with dim 32, hidden 48."""
    case = LAB.case("forward")
    ff = FeedForward(case.params["dim"], case.params["hidden"])
    with torch.no_grad():
        for name in ("w1", "w2", "w3"):
            getattr(ff, name).weight.copy_(case[name])
        y = ff(case["x"])
    check(y, case, f"FeedForward(dim=32, hidden=48) of x {tuple(case['x'].shape)}")
