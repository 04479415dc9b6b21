"""Write the graders' fixtures: each lab's inputs, the reference code's outputs, and the output of every
mistake in the catalogue (lab/mutations.py) on the same inputs.

    python -m lab.make_fixtures [--lab N ...] [--out lab/fixtures]

For lab N it writes ``labNN.safetensors`` (tensors under ``CASE.FIELD``: the inputs, ``expected``, and
``variant.MUTATION`` for each mistake whose output differs from the reference's beyond the case's
tolerance) and ``labNN.json`` (per case: parameters, tolerance, hints, and each variant's message). The cases
come from ``lab/catalogue/labNN_<slug>.py``; a mistake's output is computed by running that case on a copy of
the reference module with the mistake patched in, exactly the patch ``python -m lab.selfcheck`` grades, so a
mistake is written once. Every draw is seeded: the files are the same at every run on the same PyTorch
(``tests/test_lab_mutations.py`` regenerates them and compares).

This script and the catalogue are for instructors; student versions do not contain them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import signal
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from safetensors.torch import save_file

from .catalogue import Case
from .graders.check import matches
from .manifest import LAB_DIR, REPO, Lab, load_labs
from .mutations import CATALOGUE, Mutation


MISTAKE_SECONDS = 30.0  # per mistake and case: one that makes a loop endless must not hang the script


class TooSlow(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise TooSlow in this (the main) thread once ``seconds`` of wall time have passed."""
    def stop(signum, frame):
        raise TooSlow(f"ran over {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def catalogue_module(lab: Lab) -> types.ModuleType:
    return importlib.import_module(f"lab.catalogue.lab{lab.number:02d}_{lab.slug}")


def mutated_module(module: types.ModuleType, mutation: Mutation) -> types.ModuleType:
    """A fresh copy of ``module`` (not registered in sys.modules) executed from its source with the mistake."""
    path = REPO / mutation.file
    copy = types.ModuleType(module.__name__)
    copy.__file__, copy.__package__ = str(path), module.__package__
    exec(compile(mutation.apply(path.read_text(encoding="utf-8")), str(path), "exec"), copy.__dict__)
    return copy


def lab_code(lab: Lab, mutation: Mutation | None = None) -> SimpleNamespace:
    """The names of the lab's modules (``code.RMSNorm``), with ``mutation`` patched into its file's copy.
    A name a module defines wins over one it imports, so a mutated definition is never shadowed."""
    modules = []
    for file in lab.files:
        module = importlib.import_module(file.removesuffix(".py").replace("/", "."))
        modules.append(mutated_module(module, mutation) if mutation and mutation.file == file else module)
    names = {k: v for mod in modules for k, v in vars(mod).items() if not k.startswith("__")}
    for mod in modules:
        names.update({k: v for k, v in vars(mod).items() if getattr(v, "__module__", None) == mod.__name__})
    return SimpleNamespace(**names)


def as_tensors(output) -> tuple[torch.Tensor, ...] | None:
    """An output as a tuple of tensors (numpy arrays converted), or None when it holds anything else."""
    parts = tuple(output) if isinstance(output, (tuple, list)) else (output,)
    parts = tuple(torch.from_numpy(np.asarray(p)) if isinstance(p, np.ndarray) else p for p in parts)
    return parts if parts and all(torch.is_tensor(p) for p in parts) else None


def fresh(inputs: dict) -> dict:
    """A copy of the inputs for one run, so that a version that writes into its arguments changes nothing."""
    return {k: tuple(t.clone() for t in v) if isinstance(v, tuple) else v.clone() if torch.is_tensor(v) else v
            for k, v in inputs.items()}


def run_case(case: Case, code: SimpleNamespace, seed: int):
    torch.manual_seed(seed)  # module constructors draw from the global generator
    with torch.no_grad():
        return case.run(code, fresh(case.inputs))


class Writer:
    """One lab's tensors and case descriptions, written as two files."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.cases: dict[str, dict] = {}

    def put(self, key: str, value) -> None:
        if isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                self.put(f"{key}.{i}", v)
        else:
            self.tensors[key] = value.detach().contiguous().clone()

    def save(self, stem: Path) -> None:
        save_file(self.tensors, f"{stem}.safetensors")
        Path(f"{stem}.json").write_text(json.dumps({"cases": self.cases}, indent=1, ensure_ascii=False) + "\n",
                                        encoding="utf-8")


def lab_fixtures(lab: Lab, seconds: float = MISTAKE_SECONDS) -> Writer:
    """Every case of the lab on the reference and on each of the lab's mistakes; a mistake that runs longer
    than ``seconds`` on a case is stopped and left out of that case (the grader's time limit catches it)."""
    writer = Writer()
    reference = lab_code(lab)
    mistakes = [(mu, lab_code(lab, mu)) for mu in CATALOGUE if mu.lab == lab.number]
    for case in catalogue_module(lab).cases():
        expected = as_tensors(run_case(case, reference, lab.number))
        if expected is None:
            raise TypeError(f"lab {lab.number} case {case.name}: the reference's output is not tensors")
        meta = case.meta()
        writer.cases[case.name] = meta
        for name, value in case.inputs.items():
            writer.put(f"{case.name}.{name}", value)
        if case.record is not None:
            with torch.no_grad():
                recorded = case.record(reference, fresh(case.inputs))
            for name, value in recorded.items():
                writer.put(f"{case.name}.{name}", value)
        writer.put(f"{case.name}.expected", expected if len(expected) > 1 else expected[0])
        for mu, code in mistakes:
            try:
                with time_limit(seconds):
                    got = as_tensors(run_case(case, code, lab.number))
            except TooSlow as e:
                print(f"lab {lab.number} case {case.name}: mistake {mu.name} {e}; stopped, no wrong output stored",
                      file=sys.stderr)
                continue
            except Exception:  # noqa: BLE001 - a mistake that crashes on this case is caught by the grader itself
                continue
            if got is None or len(got) != len(expected) or all(
                    matches(g, e, meta.get("tol", {})) for g, e in zip(got, expected)):
                continue  # not a tensor answer, or this case cannot tell the mistake from the reference
            writer.put(f"{case.name}.variant.{mu.name}", got if len(got) > 1 else got[0])
            meta.setdefault("causes", {})[mu.name] = mu.message
    return writer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lab.make_fixtures", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lab", type=int, action="append", help="only this lab (repeatable); default every lab")
    parser.add_argument("--out", type=Path, default=LAB_DIR / "fixtures")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    labs = load_labs()
    for number in args.lab or list(labs):
        writer = lab_fixtures(labs[number])
        writer.save(args.out / f"lab{number:02d}")
        n_variants = sum(len(c.get("causes", {})) for c in writer.cases.values())
        print(f"lab {number}: {len(writer.cases)} cases, {n_variants} wrong outputs -> "
              f"{args.out / f'lab{number:02d}'}.*")


if __name__ == "__main__":
    main()
