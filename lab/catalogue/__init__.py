"""Each lab's catalogue, one file per lab (``labNN_<slug>.py``): ``MUTATIONS``, the typical mistakes a student
makes in that lab's functions (see lab/mutations.py), and ``cases()``, the inputs the grader feeds those
functions. ``python -m lab.make_fixtures`` runs every case on the reference and on every mistake and stores
the outputs; the grader compares a student's output with them.

A case's ``run(code, inputs)`` computes its output from ``code``, the lab's functions and classes by name
(``code.RMSNorm``): the reference's, or a copy of the module with one mistake patched in. Only ``run`` may
touch ``code``; everything else in the case (inputs, parameters) is fixed, so that every version sees the
same inputs. Draws are seeded: the files are the same at every run on the same PyTorch.

These files are for instructors; a student version does not contain them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

EXACT_BF16 = {"exact_fraction": 0.01, "rtol": 2 ** -7}  # bfloat16: one rounding step, in at most 1% of entries


@dataclass
class Case:
    name: str
    inputs: dict[str, Any]  # tensors (or tuples of them), stored as CASE.FIELD
    run: Callable  # run(code, inputs) -> the output: a tensor or a tuple of tensors
    params: dict | None = None  # JSON-able settings the grader reads (case.params)
    tol: dict | None = None  # atol/rtol, or exact_fraction/rtol for low-precision outputs
    hint: str | None = None  # shown when a wrong output matches no known mistake
    dtype_cause: str | None = None  # shown when the values are right and the dtype is not
    shape_causes: dict[str, str] = field(default_factory=dict)  # str(list(shape)) -> what that shape means
    record: Callable | None = None  # record(code, inputs) -> extra tensors stored from the reference only

    def meta(self) -> dict:
        meta = {"params": self.params, "tol": self.tol, "hint": self.hint, "dtype_cause": self.dtype_cause,
                "shape_causes": self.shape_causes or None}
        return {k: v for k, v in meta.items() if v is not None}


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g: torch.Generator, *shape, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * std
