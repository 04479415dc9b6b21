"""Prove the labs work (CI runs this): the graders isolate each lab, and they catch and name typical mistakes.

    python -m lab.selfcheck [--jobs 2] [--json FILE]

1. The reference: a student version with no lab blanked passes every grader.
2. Isolation, for every lab N: a student version with only lab N blanked fails every test of lab N and passes
   every other lab's; pasting the reference back (``python -m lab.handout --fill``) gives the reference's
   files byte for byte and passes everything.
3. The mutation catalogue (lab/mutations.py), each mistake patched into the reference version: the owning
   lab's grader fails (caught) with a message containing the mistake's phrase (named).

Exit status 0 when every check holds and at least 90% of the mutations are named. Each grading runs in a
child process forked from this one, which has imported torch and pytest once, so that a grading costs a
fraction of a second rather than an interpreter start; ``--jobs`` children run at a time.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib
import importlib.abc
import importlib.util
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .handout import fill_handout, write_handout
from .manifest import load_labs
from .mutations import CATALOGUE, Mutation

NAMED_GOAL = 0.9


class MutatedModule(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports one module of the version in ``root`` from its source with a mutation applied (in memory: the
    files stay as they are, so every child grades the same directory)."""

    def __init__(self, root: str, mutation: Mutation):
        self.path = Path(root) / mutation.file
        self.name = mutation.file.removesuffix(".py").replace("/", ".")
        self.source = mutation.apply(self.path.read_text(encoding="utf-8"))

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        return importlib.util.spec_from_file_location(fullname, self.path, loader=self)

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        exec(compile(self.source, str(self.path), "exec"), module.__dict__)


def grade_in_child(root: str, labs: list[int], mutation: str | None = None) -> list[dict]:
    """Grade ``labs`` of the student version in ``root`` (with ``mutation`` patched into its module) in this
    process, a fresh fork: it imports that version's llama_min and lab packages, not the parent's."""
    import torch

    torch.set_num_threads(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    for name in [n for n in sys.modules if n.split(".")[0] in ("lab", "llama_min")]:
        del sys.modules[name]
    if mutation is not None:
        sys.meta_path.insert(0, MutatedModule(root, next(mu for mu in CATALOGUE if mu.name == mutation)))
    sys.path.insert(0, root)
    grade = importlib.import_module("lab.grade")
    started = time.perf_counter()
    results = [{"lab": r.lab, "name": r.name, "passed": r.passed, "message": r.message}
               for r in grade.run_graders(Path(root), labs)]
    for r in results:
        r["seconds"] = round(time.perf_counter() - started, 2)
    return results


def same_files(a: Path, b: Path) -> list[str]:
    """Files under llama_min/ that differ between two versions (or exist in one only)."""
    differ = []
    for path in sorted((a / "llama_min").rglob("*.py")):
        other = b / path.relative_to(a)
        if not other.is_file() or not filecmp.cmp(path, other, shallow=False):
            differ.append(str(path.relative_to(a)))
    return differ


def isolation_report(number: int, results: list[dict]) -> list[str]:
    """What is wrong with a version that blanks lab ``number`` (empty when it is exactly isolated)."""
    problems = [f"lab {number}'s {r['name']} passes although its lab is blanked" for r in results
                if r["lab"] == number and r["passed"]]
    problems += [f"lab {r['lab']}'s {r['name']} fails when only lab {number} is blanked: {r['message'][:300]}"
                 for r in results if r["lab"] != number and not r["passed"]]
    return problems


def run(jobs: int, workdir: Path) -> dict:
    labs = load_labs()
    everything = list(labs)
    reference = workdir / "reference"
    write_handout([], reference)
    tasks: dict[str, tuple] = {"reference": (str(reference), everything, None)}
    unexpected_files = {}
    for number, lab in labs.items():
        blanked, filled = workdir / f"lab{number}", workdir / f"lab{number}_filled"
        write_handout([lab], blanked)
        shutil.copytree(blanked, filled)
        fill_handout(filled)
        unexpected_files[number] = same_files(reference, filled)
        tasks[f"blanked {number}"] = (str(blanked), everything, None)
        tasks[f"filled {number}"] = (str(filled), everything, None)
    stale = {}  # mutations whose patch no longer applies to the reference (it changed under them)
    for mu in CATALOGUE:
        try:
            mu.apply((reference / mu.file).read_text(encoding="utf-8"))
        except (ValueError, LookupError) as e:
            stale[mu.name] = str(e)
            continue
        tasks[f"mutation {mu.name}"] = (str(reference), [mu.lab], mu.name)

    context = multiprocessing.get_context("fork")
    with context.Pool(jobs, maxtasksperchild=1) as pool:
        done = dict(zip(tasks, pool.starmap(grade_in_child, tasks.values())))

    report: dict = {"reference": [f"{r['lab']} {r['name']}: {r['message'][:300]}" for r in done["reference"]
                                  if not r["passed"]], "isolation": {}, "mutations": []}
    for number in labs:
        blanked, filled = done[f"blanked {number}"], done[f"filled {number}"]
        report["isolation"][number] = {
            "lab_tests": sum(r["lab"] == number for r in blanked),
            "lab_tests_failed": sum(r["lab"] == number and not r["passed"] for r in blanked),
            "other_tests": sum(r["lab"] != number for r in blanked),
            "other_tests_failed": sum(r["lab"] != number and not r["passed"] for r in blanked),
            "problems": isolation_report(number, blanked),
            "filled_differs": unexpected_files[number],
            "filled_failures": [f"{r['lab']} {r['name']}" for r in filled if not r["passed"]]}
    for mu in CATALOGUE:
        results = done.get(f"mutation {mu.name}", [{"passed": True, "name": "-",
                                                    "message": f"stale patch: {stale.get(mu.name)}"}])
        failed = [r for r in results if not r["passed"]]
        named = [r for r in failed if mu.cause.lower() in r["message"].lower()]
        report["mutations"].append({"name": mu.name, "lab": mu.lab, "function": mu.function, "cause": mu.cause,
                                    "caught": bool(failed), "named": bool(named),
                                    "failed_tests": [r["name"] for r in failed],
                                    "seconds": results[0].get("seconds") if results else None,
                                    "message": (named or failed or results)[0]["message"][:600]})
    return report


def ok(report: dict) -> bool:
    mutations = report["mutations"]
    return (not report["reference"]
            and all(not i["problems"] and not i["filled_differs"] and not i["filled_failures"]
                    for i in report["isolation"].values())
            and all(m["caught"] for m in mutations)
            and sum(m["named"] for m in mutations) >= NAMED_GOAL * len(mutations))


def summary(report: dict) -> str:
    lines = ["reference version: " + ("every grader passes" if not report["reference"] else
                                      f"{len(report['reference'])} FAILURES (if a lab's reference changed on purpose, "
                                      "regenerate its fixtures: python -m lab.make_fixtures): "
                                      + "; ".join(report["reference"]))]
    lines.append("\nisolation (only lab N blanked)            lab N failed   others failed   pasted back")
    for number, i in report["isolation"].items():
        back = "identical, passes" if not i["filled_differs"] and not i["filled_failures"] else \
            f"DIFFERS {i['filled_differs']} FAILS {i['filled_failures']}"
        lines.append(f"  lab {number:<37}{i['lab_tests_failed']:>5}/{i['lab_tests']:<8}"
                     f"{i['other_tests_failed']:>5}/{i['other_tests']:<10}{back}")
        lines += [f"    problem: {p}" for p in i["problems"]]
    lines.append("\nper lab     blanked tests   mutations   caught   named   grade time (median, s)")
    for number, i in report["isolation"].items():
        mine = [m for m in report["mutations"] if m["lab"] == number]
        times = sorted(m["seconds"] for m in mine if m.get("seconds") is not None)
        median = f"{times[len(times) // 2]:.2f}" if times else "-"
        lines.append(f"  lab {number:<10}{i['lab_tests']:>9}{len(mine):>14}{sum(m['caught'] for m in mine):>9}"
                     f"{sum(m['named'] for m in mine):>8}{median:>14}")
    mutations = report["mutations"]
    lines.append(f"  {'total':<14}{sum(i['lab_tests'] for i in report['isolation'].values()):>9}{len(mutations):>14}"
                 f"{sum(m['caught'] for m in mutations):>9}{sum(m['named'] for m in mutations):>8}")
    for m in mutations:
        if not m["named"]:
            state = "NOT CAUGHT" if not m["caught"] else "caught, not named"
            lines.append(f"\n  {state}: {m['name']} (lab {m['lab']}, expected '{m['cause']}'); message:\n    "
                         + m["message"].replace("\n", "\n    "))
    return "\n".join(lines)


def warm_up(empty: Path) -> None:
    """Import here what every grading needs (torch, pytest and its own plugins), so that each forked child
    starts with them. No tensor operation runs before the fork: torch's thread pools start in the children."""
    import numpy  # noqa: F401
    import pytest
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    devnull = open(os.devnull, "w")
    saved = sys.stdout
    sys.stdout = devnull
    try:
        pytest.main(["-q", "-p", "no:cacheprovider", "--collect-only", str(empty)])
    finally:
        sys.stdout = saved
        devnull.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lab.selfcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="gradings run at a time")
    parser.add_argument("--json", type=Path, help="also write the full report as JSON")
    args = parser.parse_args(argv)
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="lab_selfcheck_") as workdir:
        warm_up(Path(workdir))
        report = run(args.jobs, Path(workdir))
    report["seconds"] = round(time.time() - start, 1)
    print(summary(report))
    print(f"\n{len(report['mutations'])} mutations, {len(report['isolation'])} labs checked in {report['seconds']} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    raise SystemExit(0 if ok(report) else 1)


if __name__ == "__main__":
    main()
