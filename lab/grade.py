"""Grade the labs: run each lab's grader, score it with the rubric, print a table, write Gradescope's JSON.

    python -m lab.grade                        # every lab
    python -m lab.grade --lab 3 --lab 4        # some labs
    python -m lab.grade --json results.json    # also the results in Gradescope's autograder format
    python -m lab.grade --hidden DIR           # add an instructor's hidden tests (or LAB_HIDDEN_TESTS=DIR)

Points come from lab/rubric.toml (hidden tests: DIR/rubric.toml; 1 point for a test it does not list). Each
lab is graded in a child process of its own on a copy of the current directory in which every other lab's
files are as handed out (lab/starter), so one lab's broken file cannot fail another, and an ``os._exit`` or an
endless loop costs only that lab (lab/isolate.py; ``--in-process`` runs every grader in this process instead).
The exit status is 0 when every test passed.

The JSON follows https://gradescope-autograders.readthedocs.io/en/latest/specs/ (output format): a top-level
"score", "execution_time", "output", "visibility", "stdout_visibility" and "tests", each test with "name",
"number", "score", "max_score", "status", "output", "tags" and "visibility". Hidden tests are
"after_published": students see them once the instructor publishes the grades, and the top-level "output",
which students see at once, covers the visible tests only.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

HIDDEN_ENV = "LAB_HIDDEN_TESTS"
NO_PLUGINS = "PYTEST_DISABLE_PLUGIN_AUTOLOAD"
HIDDEN_NAME = re.compile(r"test_lab(\d+)_\w+\.py$")
RUBRIC_SECTION = re.compile(r"lab(\d+)")
HANDIN = "handin"  # [labN.handin]: the rubric of the hand-ins a person grades


@dataclass
class Result:
    lab: int
    name: str  # the pytest test name, e.g. test_apply_rotary[float32]
    passed: bool
    message: str  # why it failed, written for the student; empty when it passed
    max_points: float
    hidden: bool = False

    @property
    def points(self) -> float:
        return self.max_points if self.passed else 0.0


class Collector:
    """A pytest plugin that keeps each test's outcome and, for a failure, a message for the student. Tests are
    keyed by (grader file name, test name); ``on_outcome`` sees each outcome as it is made."""

    def __init__(self):
        self.outcomes: dict[tuple[str, str], tuple[bool, str]] = {}  # (file name, test name) -> (passed, message)
        self.broken: dict[str, str] = {}  # grader file name that failed to import -> the error

    def on_outcome(self, key: tuple[str, str], outcome: tuple[bool, str]) -> None:
        """Called with every new outcome (a subclass records it)."""

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = (yield).get_result()
        if report.when == "call" or report.failed:
            key = (Path(item.path).name, item.nodeid.partition("::")[2])
            message = "" if report.passed else student_message(call.excinfo)
            if key not in self.outcomes or not report.passed:
                self.outcomes[key] = (report.passed and report.when == "call", message)
                self.on_outcome(key, self.outcomes[key])

    def pytest_collectreport(self, report):
        if report.failed:
            lines = report.longreprtext.splitlines()
            errors = [line.strip()[2:] for line in lines if line.strip().startswith("E ")]
            self.broken[Path(report.fspath).name] = "\n".join(errors or lines[-8:])


def student_message(excinfo) -> str:
    """A grader's own message as it is; any other error with its type, message and the lines of llama_min
    (the student's code) it passed through."""
    if excinfo is None:
        return "failed"
    error = excinfo.value
    if isinstance(error, AssertionError) and type(error).__name__ == "GraderError":
        return str(error)
    if isinstance(error, NotImplementedError):
        return f"not written yet. {error}"
    frames = [f"  llama_min/{Path(str(e.path)).as_posix().split('/llama_min/')[-1]}, line {e.lineno + 1}: "
              f"{str(e.statement).strip().splitlines()[0]}"
              for e in excinfo.traceback if "/llama_min/" in Path(str(e.path)).as_posix()]
    where = ("\nwhere, in your code:\n" + "\n".join(frames[-3:])) if frames else ""
    return f"{type(error).__name__}: {error}{where}"


def parse_rubric(path: Path) -> tuple[dict[int, dict[str, float]], dict[int, dict[str, float]]]:
    """(points per grader test, points per hand-in) by lab, from a rubric file: ``[labN]`` lists grader tests,
    ``[labN.handin]`` the hand-ins a person grades (a file, or ``FILE#Q`` for question Q of answers.md). A
    missing file is an empty rubric; any other section, or points that are not a number >= 0, is an error."""
    from .manifest import tomllib

    if not path.is_file():
        return {}, {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from None
    tests, handins = {}, {}
    for section, entries in data.items():
        match = RUBRIC_SECTION.fullmatch(section)
        if not match or not isinstance(entries, dict):
            raise ValueError(f"{path}: [{section}] is not a lab; name the sections [labN] (grader tests) and "
                             f"[labN.{HANDIN}] (hand-ins a person grades)")
        number = int(match.group(1))
        tests[number] = {name: points(path, section, name, value) for name, value in entries.items()
                         if name != HANDIN}
        if HANDIN in entries:
            handin = entries[HANDIN]
            if not isinstance(handin, dict):
                raise ValueError(f"{path}: {section}.{HANDIN} must be a table [{section}.{HANDIN}] of hand-in = points")
            handins[number] = {name: points(path, f"{section}.{HANDIN}", name, value) for name, value in handin.items()}
    return tests, handins


def points(path: Path, section: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"{path}: [{section}] {name} = {value!r}: points must be a number >= 0")
    return float(value)


def read_rubric(path: Path) -> dict[int, dict[str, float]]:
    """The points of each lab's grader tests (``[labN]`` of the rubric file)."""
    return parse_rubric(path)[0]


def hidden_files(hidden: Path | None) -> dict[int, list[Path]]:
    """DIR/test_labNN_*.py by lab; any other test file there is an error naming the convention."""
    if hidden is None:
        return {}
    hidden = Path(hidden)
    if not hidden.is_dir():
        raise FileNotFoundError(f"hidden tests directory {hidden} does not exist")
    files: dict[int, list[Path]] = {}
    for path in sorted(hidden.glob("test_*.py")):
        match = HIDDEN_NAME.match(path.name)
        if not match:
            raise ValueError(f"hidden test file {path.name}: name it test_labNN_<topic>.py (NN the lab number) so "
                             "that its points go to that lab")
        files.setdefault(int(match.group(1)), []).append(path.resolve())
    return files


def grader_files(root: Path, labs: list[int], hidden: Path | None = None, public: bool = True
                 ) -> list[tuple[int, Path, bool]]:
    """(lab, test file, is hidden) for the public graders of ``labs`` (unless ``public`` is false) and their
    hidden tests in ``hidden``."""
    from .manifest import load_labs

    manifest = load_labs(root / "lab" / "manifest.toml")
    extra = hidden_files(hidden)
    files = [(number, (root / "lab" / manifest[number].grader).resolve(), False) for number in labs if public]
    return files + [(number, path, True) for number in labs for path in extra.get(number, [])]


def run_pytest(root: Path, paths: list[Path], collector: Collector, echo: bool = False) -> None:
    """Run the test files ``paths`` with pytest in this process, reporting to ``collector``."""
    args = [str(path) for path in paths]
    # no:unraisableexception: its gc.collect() passes at the end cost half a second with torch loaded
    args += ["-q", "-p", "no:cacheprovider", "-p", "no:unraisableexception", "--import-mode=importlib",
             "--continue-on-collection-errors",
             "--rootdir", str(root), "-o", "addopts=", "--tb=no", "-W", "ignore::DeprecationWarning"]
    # The graders need no third-party pytest plugin; loading them all (hypothesis, ...) can cost seconds.
    saved = os.environ.get(NO_PLUGINS)
    os.environ[NO_PLUGINS] = "1"
    try:
        with contextlib.nullcontext() if echo else contextlib.redirect_stdout(io.StringIO()):
            pytest.main(args, plugins=[collector])
    finally:
        if saved is None:
            del os.environ[NO_PLUGINS]
        else:
            os.environ[NO_PLUGINS] = saved


def score(labs: list[int], files: list[tuple[int, Path, bool]], outcomes: dict[tuple[str, str], tuple[bool, str]],
          broken: dict[str, str], rubric: dict, hidden_rubric: dict, expected: dict[str, list[str]] | None = None,
          missing: str = "not run: no such test in the grader") -> list[Result]:
    """The results of ``labs``: every test the rubric lists, ran, or ``expected`` names (file name -> test
    names), with its points; a test that did not run fails with ``missing`` (or the load error of its file)."""
    results = []
    for number in labs:
        for is_hidden in (False, True):
            names = [path.name for n, path, h in files if n == number and h == is_hidden]
            ran = {test: outcome for (file, test), outcome in outcomes.items() if file in names}
            broken_here = [f"{name} failed to load:\n{broken[name]}" for name in names if name in broken]
            not_run = (False, "not run: " + "\n".join(broken_here) if broken_here else missing)
            points = (hidden_rubric if is_hidden else rubric).get(number, {}) if names else {}
            listed = [test for name in names for test in (expected or {}).get(name, [])]
            for name in dict.fromkeys([*points, *listed, *ran]):
                passed, message = ran.get(name, not_run)
                results.append(Result(number, name, passed, message, float(points.get(name, 1.0)), is_hidden))
            results += [Result(number, f"{name} (failed to load)", False, broken[name], 0.0, is_hidden)
                        for name in names if name in broken]
    return results


def rubrics(root: Path, hidden: Path | None) -> tuple[dict, dict]:
    """The points of the public graders (root/lab/rubric.toml) and of the hidden tests (hidden/rubric.toml)."""
    return read_rubric(root / "lab" / "rubric.toml"), read_rubric(Path(hidden) / "rubric.toml") if hidden else {}


def run_graders(root: Path, labs: list[int], hidden: Path | None = None, echo: bool = False) -> list[Result]:
    """Run the graders of ``labs`` (and their hidden tests) found under ``root`` in this process: fast, and
    trusting the code it grades (lab/isolate.py grades code it does not trust)."""
    files = grader_files(root, labs, hidden)
    collector = Collector()
    run_pytest(root, [path for _, path, _ in files], collector, echo)
    return score(labs, files, collector.outcomes, collector.broken, *rubrics(root, hidden))


def table(results: list[Result], titles: dict[int, str]) -> str:
    """The per-lab score table, then every failure with its message."""
    lines = [f"{'lab':<4}{'topic':<58}{'tests passed':>14}{'points':>12}"]
    for number in sorted({r.lab for r in results}):
        mine = [r for r in results if r.lab == number]
        passed = sum(r.passed for r in mine)
        lines.append(f"{number:<4}{titles.get(number, ''):<58}{f'{passed}/{len(mine)}':>14}"
                     f"{f'{sum(r.points for r in mine):g}/{sum(r.max_points for r in mine):g}':>12}")
    total, most = sum(r.points for r in results), sum(r.max_points for r in results)
    passed = f"{sum(r.passed for r in results)}/{len(results)}"
    lines.append(f"{'':<4}{'total':<58}{passed:>14}{f'{total:g}/{most:g}':>12}")
    for r in results:
        if not r.passed:
            body = "\n".join("    " + line for line in r.message.splitlines())
            lines.append(f"\nFAILED lab {r.lab} {r.name}{' (hidden)' if r.hidden else ''}\n{body}")
    return "\n".join(lines)


def gradescope(results: list[Result], seconds: float, titles: dict[int, str]) -> dict:
    """The results in Gradescope's autograder format (see the module docstring). The top-level ``output``,
    which students see at once, holds the table and failures of the visible tests only: a hidden test's name
    and message appear only in its own after_published entry."""
    tests, counters = [], {}
    for r in results:
        counters[r.lab] = counters.get(r.lab, 0) + 1
        tests.append({"name": f"Lab {r.lab}: {r.name}", "number": f"{r.lab}.{counters[r.lab]}",
                      "score": r.points, "max_score": r.max_points, "status": "passed" if r.passed else "failed",
                      "output": r.message, "tags": [f"lab{r.lab}"] + (["hidden"] if r.hidden else []),
                      "visibility": "after_published" if r.hidden else "visible"})
    visible = table([r for r in results if not r.hidden], titles)
    return {"score": sum(r.points for r in results), "execution_time": round(seconds, 1), "output": visible,
            "visibility": "visible", "stdout_visibility": "hidden", "tests": tests}


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` whole or not at all (a temporary file renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(partial, path)


def main(argv: list[str] | None = None) -> None:
    from .isolate import Limits, Sandbox, grade_isolated
    from .manifest import STARTER, choose_labs, load_labs

    root = Path.cwd()
    parser = argparse.ArgumentParser(prog="python -m lab.grade", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lab", type=int, action="append", help="grade this lab (repeatable); default: every lab")
    parser.add_argument("--json", type=Path, help="also write the results in Gradescope's format to this file")
    parser.add_argument("--hidden", type=Path, default=os.environ.get(HIDDEN_ENV) or None,
                        help=f"a directory of hidden tests test_labNN_*.py (default: ${HIDDEN_ENV})")
    parser.add_argument("--time-limit", type=float, default=Limits.time_s, help="seconds per lab (default %(default)g)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every grader in this process: faster, but one lab's broken file fails them all "
                             "and the code graded can change the verdict")
    parser.add_argument("--verbose", action="store_true", help="show pytest's own output too (with --in-process)")
    args = parser.parse_args(argv)
    if not (root / "lab" / "manifest.toml").is_file():
        raise SystemExit(f"lab.grade: error: run it from the repository root (no lab/manifest.toml in {root})")
    manifest = load_labs(root / "lab" / "manifest.toml")
    try:
        labs = [lab.number for lab in choose_labs(args.lab or list(manifest), manifest)]
        handins = parse_rubric(root / "lab" / "rubric.toml")[1]
        start = time.time()
        if args.in_process:
            results = run_graders(root, labs, args.hidden, echo=args.verbose)
        else:
            # the student grading their own code: no other user to switch to
            results, _ = grade_isolated(root, root, {n: manifest[n] for n in labs}, args.hidden,
                                        Limits(time_s=args.time_limit), starter=root / STARTER, sandbox=Sandbox(),
                                        workers=min(2, os.cpu_count() or 1))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"lab.grade: error: {e}") from None
    titles = {n: lab.title for n, lab in manifest.items()}
    print(table(results, titles))
    by_hand = [f"lab {n} {sum(handins[n].values()):g}" for n in labs if handins.get(n)]
    if by_hand:
        print(f"\nnot in these points: the hand-ins your instructor grades ([labN.{HANDIN}] of lab/rubric.toml), "
              f"worth {', '.join(by_hand)} points")
    if args.json:
        write_json(args.json, gradescope(results, time.time() - start, titles))
        print(f"\nwrote {args.json} (Gradescope's results format)")
    raise SystemExit(0 if all(r.passed for r in results) else 1)


if __name__ == "__main__":
    main()
