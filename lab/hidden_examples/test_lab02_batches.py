"""An example hidden test for lab 2: the feed-forward applied to each sequence of the batch on its own gives
the stored reference outputs (no mixing across the batch), judged outside the student's process by ``check``."""

import torch

from lab.graders.check import LabFixtures, check
from llama_min.feedforward import FeedForward

LAB = LabFixtures(2)


def test_each_sequence_alone():
    case = LAB.case("forward")
    ff = FeedForward(case.params["dim"], case.params["hidden"])
    with torch.no_grad():
        for name in ("w1", "w2", "w3"):
            getattr(ff, name).weight.copy_(case[name])
        y = torch.cat([ff(x[None]) for x in case["x"]])
    check(y, case, "FeedForward of each (1, 5, 32) sequence on its own")
