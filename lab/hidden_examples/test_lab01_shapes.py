"""An example hidden test for lab 1 (python -m lab.pack --autograder --hidden lab/hidden_examples): RMSNorm on
inputs laid out differently from the public grader's, compared with the same stored reference outputs through
``check``, so that the autograder judges it outside the student's process."""

import torch

from lab.graders.check import LabFixtures, check
from llama_min.rmsnorm import RMSNorm

LAB = LabFixtures(1)


def test_flattened_rows():
    """The (3, 5, 64) case as 15 rows of a 2-D input: each row is normalised on its own."""
    case = LAB.case("forward.float32")
    x, weight = case["x"], case["weight"]
    norm = RMSNorm(weight.shape[0], case.params["eps"])
    with torch.no_grad():
        norm.weight.copy_(weight)
        y = norm(x.reshape(-1, x.shape[-1])).reshape(x.shape)
    check(y, case, "RMSNorm of the float32 case's rows as a (15, 64) input")


def test_one_row_at_a_time():
    """Each row of the large-eps case alone: no statistic may mix rows."""
    case = LAB.case("forward.eps")
    x, weight = case["x"], case["weight"]
    norm = RMSNorm(weight.shape[0], case.params["eps"])
    with torch.no_grad():
        norm.weight.copy_(weight)
        y = torch.stack([norm(row) for row in x.reshape(-1, x.shape[-1])]).reshape(x.shape)
    check(y, case, "RMSNorm of each (64,) row of the eps case on its own")
