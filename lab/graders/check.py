"""What every grader uses: the stored reference outputs of a lab, and a comparison whose failure says what
was expected and, when the output is that of a known mistake, names the mistake.

A lab's fixtures are two files written by the instructor's ``python -m lab.make_fixtures``:
``lab/fixtures/labNN.safetensors`` (inputs, reference outputs and the outputs of the instructor's catalogue
of typical mistakes, under ``CASE.FIELD``) and ``lab/fixtures/labNN.json`` (per case: parameters, tolerances,
and for each mistake what it gets wrong). No reference code is shipped: only its outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


class GraderError(AssertionError):
    """A failed check, with a message written for the student."""


class Case:
    """One stored case: its tensors (``case["x"]``), ``params``, and the outputs of known mistakes."""

    def __init__(self, name: str, tensors: dict[str, torch.Tensor], meta: dict):
        self.name, self.meta = name, meta
        self.tensors = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        self.params: dict = meta.get("params", {})

    def __getitem__(self, field: str) -> torch.Tensor:
        return self.tensors[field].clone()

    def output(self, field: str = "expected") -> tuple[torch.Tensor, ...]:
        """A stored output as a tuple of tensors (``FIELD`` or ``FIELD.0``, ``FIELD.1``, ...)."""
        if field in self.tensors:
            return (self[field],)
        parts = []
        while f"{field}.{len(parts)}" in self.tensors:
            parts.append(self[f"{field}.{len(parts)}"])
        return tuple(parts)

    def mistakes(self) -> dict[str, tuple[tuple[torch.Tensor, ...], str]]:
        """Known wrong versions: name -> (their output, what they get wrong)."""
        return {name: (self.output(f"variant.{name}"), cause) for name, cause in self.meta.get("causes", {}).items()}


class LabFixtures:
    def __init__(self, number: int):
        stem = FIXTURES / f"lab{number:02d}"
        self.tensors = load_file(f"{stem}.safetensors")
        self.meta = json.loads(Path(f"{stem}.json").read_text(encoding="utf-8"))

    def case(self, name: str) -> Case:
        if name not in self.meta["cases"]:
            raise KeyError(f"no fixture case {name!r}; regenerate the fixtures (python -m lab.make_fixtures)")
        return Case(name, self.tensors, self.meta["cases"][name])


# ---- comparing -------------------------------------------------------------------------------------------

def _as_tuple(got) -> tuple:
    return tuple(got) if isinstance(got, (tuple, list)) else (got,)


def matches(got: torch.Tensor, want: torch.Tensor, tol: dict) -> bool:
    """Whether got equals want within the case's tolerance. ``exact_fraction`` (low-precision outputs): at
    most that fraction of the elements may differ, each by at most ``rtol`` relatively (one rounding step)."""
    if not torch.is_tensor(got) or got.shape != want.shape:
        return False
    if want.dtype == torch.bool:
        return got.dtype == torch.bool and torch.equal(got, want)
    if not want.is_floating_point():
        return not got.is_floating_point() and torch.equal(got.long(), want.long())
    g, w = got.detach().double(), want.double()
    if tol.get("exact_fraction") is not None:
        differ = (g != w) & ~(g.isnan() & w.isnan())
        return differ.float().mean().item() <= tol["exact_fraction"] and torch.allclose(
            g, w, atol=0.0, rtol=tol.get("rtol", 2 ** -7), equal_nan=True)
    return torch.allclose(g, w, atol=tol.get("atol", 1e-5), rtol=tol.get("rtol", 1e-4), equal_nan=True)


def _describe(t) -> str:
    if not torch.is_tensor(t):
        return f"a {type(t).__name__}"
    return f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"


def _values(t: torch.Tensor, at: tuple[int, ...] | None = None, n: int = 6) -> str:
    flat = t.detach().reshape(-1) if at is None else t.detach()[at[:-1]].reshape(-1)
    start = 0 if at is None else max(0, at[-1] - 2)
    vals = flat[start:start + n].tolist()
    fmt = (lambda v: str(v)) if not t.is_floating_point() else (lambda v: f"{v:.4g}")
    where = "" if at is None else f" at [{''.join(f'{i}, ' for i in at[:-1])}{start}:{start + len(vals)}]"
    return "[" + ", ".join(fmt(v) for v in vals) + "]" + where


def explain(got, want: torch.Tensor, what: str) -> str:
    """The first difference between got and want, for a message."""
    if not torch.is_tensor(got):
        return f"{what} returned {_describe(got)}; expected a tensor {_describe(want)}."
    if got.shape != want.shape:
        return f"{what} has shape {tuple(got.shape)}; expected {tuple(want.shape)}."
    if not want.is_floating_point():
        wrong = (got.long() != want.long()).nonzero()
        at = tuple(wrong[0].tolist()) if len(wrong) else None
        return (f"{what}: {len(wrong)} of {want.numel()} entries differ; first at {list(at) if at else '-'}: expected "
                f"{want[at].item() if at else '-'}, got {got[at].item() if at else '-'}.")
    g, w = got.detach().double(), want.double()
    if g.isnan().any() and not w.isnan().any():
        at = tuple(g.isnan().nonzero()[0].tolist())
        return f"{what} has NaN at {list(at)} ({int(g.isnan().sum())} NaN in all); the reference has none."
    diff = (g - w).abs().nan_to_num(float("inf"))
    at = tuple(torch.unravel_index(diff.argmax(), diff.shape)) if diff.dim() else ()
    at = tuple(int(i) for i in at)
    if not at:
        return f"{what}: expected {w.item():.6g}, got {g.item():.6g}."
    return (f"{what}: largest difference {diff[at].item():.3g} at {list(at)}.\n"
            f"  expected {_values(want, at)}\n  got      {_values(got, at)}")


def check(got, case: Case, what: str) -> None:
    """Fail with a teaching message unless ``got`` (a tensor or a tuple of tensors) equals the case's stored
    output, in value and dtype. The message names the known mistakes whose output ``got`` equals; otherwise it
    reports a wrong type, shape or dtype before any value, then where the values differ."""
    __tracebackhide__ = True
    want = case.output()
    tol = case.meta.get("tol", {})
    got = _as_tuple(got)
    if len(got) != len(want):
        raise GraderError(f"{what} returned {len(got)} value(s); expected {len(want)}: "
                          + ", ".join(_describe(w) for w in want))
    label = (lambda i: f" [{i}]" if len(want) > 1 else "")
    if all(matches(g, w, tol) for g, w in zip(got, want)):
        for i, (g, w) in enumerate(zip(got, want)):
            if g.dtype != w.dtype:
                raise GraderError(f"{what}{label(i)} has dtype {_dtype(g)}; expected {_dtype(w)}. "
                                  f"{case.meta.get('dtype_cause', '')}".rstrip())
        return
    causes = [cause for output, cause in case.mistakes().values()
              if len(output) == len(got) and all(matches(g, o, tol) for g, o in zip(got, output))]
    if causes:
        kind = "".join(_type_note(f"{what}{label(i)}", g, w) for i, (g, w) in enumerate(zip(got, want)))
        raise GraderError(kind + f"{what}: wrong output.\nLikely mistake: " + "\nor: ".join(causes) + "\n"
                          + _first_difference(got, want, tol))
    shape_causes = case.meta.get("shape_causes", {})
    for i, (g, w) in enumerate(zip(got, want)):
        if not torch.is_tensor(g):
            raise GraderError(f"{what}{label(i)} is {_describe(g)}; expected a tensor {_describe(w)}.")
        if g.shape != w.shape:
            cause = shape_causes.get(str(list(g.shape)))
            raise GraderError(f"{what}{label(i)} has shape {tuple(g.shape)}; expected {tuple(w.shape)}."
                              + (f"\nLikely mistake: {cause}" if cause else ""))
    for i, (g, w) in enumerate(zip(got, want)):
        if g.dtype != w.dtype:
            raise GraderError(f"{what}{label(i)} has dtype {_dtype(g)}; expected {_dtype(w)}. "
                              f"{case.meta.get('dtype_cause', '')}".rstrip() + "\nIts values differ too: "
                              + _first_difference(got, want, tol))
    hint = case.meta.get("hint")
    raise GraderError(f"{what}: wrong output.\n" + _first_difference(got, want, tol)
                      + (f"\nCheck: {hint}" if hint else ""))


def _type_note(what: str, got: torch.Tensor, want: torch.Tensor) -> str:
    """A line saying how got's shape or dtype differs from want's (empty when they agree)."""
    if got.shape != want.shape:
        return f"{what} has shape {tuple(got.shape)}; expected {tuple(want.shape)}.\n"
    if got.dtype != want.dtype:
        return f"{what} has dtype {_dtype(got)}; expected {_dtype(want)}.\n"
    return ""


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _first_difference(got: tuple, want: tuple, tol: dict) -> str:
    for i, (g, w) in enumerate(zip(got, want)):
        if not matches(g, w, tol):
            return explain(g, w, "the output" + (f" [{i}]" if len(want) > 1 else ""))
    return ""


def fail(message: str) -> None:
    __tracebackhide__ = True
    raise GraderError(message)
