"""Grade code that is not trusted: each lab in a child process of its own, on a fresh copy of the handout with
only that lab's files taken from the student, as an unprivileged user where there is one, with time and memory
limits; then judge the outputs the child saved in this process, which never imports the student's code.

Why each piece:
- one lab per child, on a clean copy: ``llama_min/__init__.py`` imports every module, so another lab's broken
  file (a SyntaxError) would otherwise fail this lab too, and the student's copy of the graders, fixtures or
  rubric is never used;
- a child process: ``os._exit``, an endless loop or a crash ends the child, not the grading; tests that
  finished keep their results;
- an unprivileged user (``LAB_SANDBOX_USER``, default ``labstudent``, else ``nobody``) when this runs as root,
  as on Gradescope: the student's code cannot delete or change the grader's files, the hidden tests or the
  results. Not root: the child runs as this user, and ``notes`` says so;
- judging here: every comparison a grader made through ``check`` is made again, by this process's own
  ``check`` on the saved outputs (plain tensors from safetensors files), so a student's
  ``torch.allclose = lambda *a, **k: True`` patches only the child. With ``pins`` (the comparisons each test
  made on the reference, recorded when the autograder was built) a test must also make exactly those: a
  child that skips them fails. What a test asserts outside ``check`` (a property, a stand-in's complaint) is
  the child's word, and can only fail a test, never pass one that a comparison failed.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .grade import Result, grader_files, rubrics, score
from .manifest import Lab

MAX_SUBMITTED = 2 ** 20  # bytes: a larger source file is not taken from a submission
MAX_EVENTS = 16 * 2 ** 20  # bytes of events.jsonl read back
DEFAULT_USER = "labstudent"
USER_ENV = "LAB_SANDBOX_USER"
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "cache")  # data/cache: train.py's


@dataclass
class Limits:
    time_s: float = 300.0  # wall clock per child (also its CPU seconds)
    memory_mb: int = 4096  # address space of the child


@dataclass
class Sandbox:
    """Whom the child runs as: ``uid``/``gid`` of an unprivileged user, or None for this process's own."""
    uid: int | None = None
    gid: int | None = None
    notes: list[str] = field(default_factory=list)


def sandbox_user() -> Sandbox:
    """The unprivileged user to run students' code as, when this process is root and the machine has one that
    can run this Python and import torch."""
    if os.geteuid() != 0:
        return Sandbox(notes=[f"the student's code ran as this user (uid {os.geteuid()}): not root, so it cannot "
                              "switch to an unprivileged one; it could change files this user can write"])
    tried = []
    for name in dict.fromkeys([os.environ.get(USER_ENV) or DEFAULT_USER, "nobody"]):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid == 0:
            continue
        why = usable(entry.pw_uid, entry.pw_gid)
        if why is None:
            return Sandbox(entry.pw_uid, entry.pw_gid, [f"the student's code ran as the unprivileged user {name}"])
        tried.append(f"{name} cannot ({why})")
    return Sandbox(notes=["WARNING: the student's code ran as root, so it could change the grader's files (a "
                          "change scores the lab 0): " + ("; ".join(tried) if tried else
                          f"this machine has no unprivileged user ({os.environ.get(USER_ENV) or DEFAULT_USER} or "
                          "nobody); create one with useradd") + f"; it must be able to run {sys.executable} and "
                          "import torch"])


PROBE = "import importlib.util, safetensors, pytest; assert importlib.util.find_spec('torch'), 'no torch'"


def usable(uid: int, gid: int) -> str | None:
    """None when the user can run this Python and import what the graders need, else why not."""
    try:
        probe = subprocess.run([sys.executable, "-s", "-c", PROBE], user=uid, group=gid,
                               extra_groups=[], env={"PATH": os.defpath}, cwd="/", capture_output=True, text=True,
                               timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{type(e).__name__}: {e}"
    return None if probe.returncode == 0 else (probe.stderr.strip().splitlines() or ["failed"])[-1]


def fingerprint(*roots: Path) -> dict[str, tuple]:
    """Every path under ``roots`` with its type, size, mode and modification time: a changed or deleted file
    shows as a different fingerprint."""
    seen = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d != "__pycache__"]  # Python's own caches may come and go
            for name in dirs + files:
                path = os.path.join(folder, name)
                try:
                    info = os.lstat(path)
                except OSError:
                    continue
                seen[path] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return seen


def find_submitted(source: Path, file: str) -> Path | None:
    """The student's copy of ``file`` (e.g. llama_min/rope.py) in ``source``: at that path, under one top
    directory (a zip of the whole handout folder), or, for a plain upload, by its name alone. Only a regular
    file (no link) of at most MAX_SUBMITTED bytes inside ``source`` counts."""
    candidates = [source / file, *sorted(source.glob(f"*/{file}")), source / Path(file).name]
    for path in candidates:
        try:
            info = path.lstat()
        except OSError:
            continue
        inside = path.parent.resolve().is_relative_to(source.resolve())
        if inside and stat.S_ISREG(info.st_mode) and info.st_size <= MAX_SUBMITTED and not any(
                p.is_symlink() for p in path.relative_to(source).parents if p != Path(".")):
            return path
    return None


def child_tree(base: Path, source: Path, lab: Lab, starter: Path | None, dest: Path) -> list[str]:
    """Lay out in ``dest`` what the child needs: the package, lab/, data/ and the top-level scripts of ``base``, the
    files as handed out from ``starter`` (every blanked lab's), then ``lab``'s files from ``source``.
    Returns notes on files the student did not hand in (the handout's version is graded instead)."""
    dest.mkdir()
    for part in ("llama_min", "lab"):
        shutil.copytree(base / part, dest / part, ignore=SKIP, symlinks=False)
    for script in sorted(base.glob("*.py")):
        shutil.copy2(script, dest / script.name)
    if (base / "data").is_dir():  # a copy: the child's user may not be able to read the original's folders
        shutil.copytree(base / "data", dest / "data", ignore=SKIP)
    if starter is not None and starter.is_dir():
        for path in sorted(starter.rglob("*.py")):
            shutil.copy2(path, dest / path.relative_to(starter))
    notes = []
    for file in lab.files:
        found = find_submitted(source, file)
        if found is None:
            notes.append(f"{file}: not handed in; graded the handout's version")
        elif found.resolve() != (dest / file).resolve():
            shutil.copyfile(found, dest / file)
    return notes


def give(path: Path, sandbox: Sandbox) -> None:
    """Make ``path`` and everything under it the sandbox user's."""
    if sandbox.uid is None:
        return
    for item in [path, *path.rglob("*")]:
        os.lchown(item, sandbox.uid, sandbox.gid)


def kill_user(sandbox: Sandbox) -> None:
    """End every process the sandbox user still has (a student's code may have forked and left the group)."""
    if sandbox.uid is not None:
        subprocess.run([sys.executable, "-c", "import os, signal; os.kill(-1, signal.SIGKILL)"], user=sandbox.uid,
                       group=sandbox.gid, extra_groups=[], env={}, check=False, timeout=30)


@dataclass
class Child:
    """What a child left behind: its events, where its saved outputs are, and how it ended."""
    events: list[dict]
    out: Path
    returncode: int
    timed_out: bool
    log: str


def run_child(work: Path, lab: int, hidden: bool, limits: Limits, sandbox: Sandbox) -> Child:
    out = work / "out"
    out.mkdir()
    give(work, sandbox)
    command = [sys.executable, "-s", "-m", "lab.record", "--lab", str(lab), "--out", str(out),
               "--memory-mb", str(limits.memory_mb), "--cpu-s", str(int(limits.time_s) + 1)]
    command += ["--hidden", "hidden"] if hidden else []
    command += ["--processes", "256"] if sandbox.uid is not None else []  # a fork bomb stops there
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(work / "tree"), "LANG": "C.UTF-8",
           "PYTHONPATH": str(work / "tree"), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
           "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    user = {} if sandbox.uid is None else {"user": sandbox.uid, "group": sandbox.gid, "extra_groups": []}
    with open(work / "log.txt", "w+b") as log:
        child = subprocess.Popen(command, cwd=work / "tree", env=env, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True, **user)
        timed_out = False
        try:
            child.wait(timeout=limits.time_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        child.wait()
        kill_user(sandbox)
        log.seek(max(0, log.seek(0, os.SEEK_END) - 4000))
        tail = log.read().decode("utf-8", "replace")
    return Child(read_events(out / "events.jsonl"), out, child.returncode, timed_out, tail)


def read_events(path: Path) -> list[dict]:
    """The child's events that parse as JSON objects, from at most MAX_EVENTS bytes."""
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_EVENTS).decode("utf-8", "replace")
    except OSError:
        return []
    events = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def _text(value) -> str:
    return value if isinstance(value, str) else ""


def why_stopped(child: Child, limits: Limits) -> str:
    if child.timed_out:
        return f"the time limit ({limits.time_s:g} s) ran out during this test: does your code loop forever?"
    code = child.returncode
    how = f"killed by signal {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() \
        else f"exit status {code}"
    return (f"the grading process ended during this test ({how}): does your code call exit() or os._exit(), or "
            f"use more than the memory limit ({limits.memory_mb} MB)?")


def fixture_numbers(base: Path) -> list[int]:
    """The labs whose fixtures base/lab/fixtures holds."""
    return sorted(int(p.stem[3:]) for p in (base / "lab" / "fixtures").glob("lab[0-9][0-9].json"))


class Judge:
    """Re-runs recorded comparisons with this process's own ``check`` and fixtures. Build it (it loads every
    fixture it can need) before any student code runs, so that nothing a child does to the files matters."""

    def __init__(self, fixtures: list[int]):
        if "llama_min" in sys.modules:
            raise RuntimeError("the judge must not run in a process that imported llama_min (the student's code)")
        from .graders import check as checks

        self.check, self.GraderError = checks.check, checks.GraderError
        self.fixtures = {number: checks.LabFixtures(number) for number in fixtures}

    def verdict(self, record: dict, out: Path) -> str | None:
        """None when the recorded output matches, else the message of the failure."""
        from safetensors.torch import load_file

        what = _text(record.get("what")) or "the output"
        fixture, case = record.get("fixture"), record.get("case")
        if fixture not in self.fixtures or not isinstance(case, str) or case not in self.fixtures[fixture].meta["cases"]:
            return f"{what}: the grader compared it with an unknown reference ({fixture}, {case!r})"
        kinds = record.get("parts") if isinstance(record.get("parts"), list) else []
        index = record.get("index")
        path = out / f"check{index}.safetensors"
        try:
            if not isinstance(index, int) or path.is_symlink() or path.stat().st_size > 2 ** 28:
                raise OSError("no usable output file")
            tensors = load_file(str(path))
        except Exception:
            return f"{what}: its output could not be saved for grading (not a plain tensor?)"
        parts = [tensors.get(str(i)) if kind == "tensor" else type(str(kind), (), {})()
                 for i, kind in enumerate(kinds)]
        if any(p is None for p in parts):
            return f"{what}: its output could not be saved for grading"
        got = tuple(parts) if record.get("tuple") else (parts[0] if len(parts) == 1 else tuple(parts))
        try:
            self.check(got, self.fixtures[fixture].case(case), what)
        except self.GraderError as e:
            return str(e)
        return None

    def outcomes(self, child: Child, limits: Limits, pins: dict[str, list] | None
                 ) -> tuple[dict[tuple[str, str], tuple[bool, str]], dict[str, str], str]:
        """(file, test) -> (passed, message) judged from a child's events; the files that failed to load;
        and the message for tests that never ran."""
        said, checks, started, broken = {}, {}, [], {}
        finished = any(e.get("event") == "done" for e in child.events)
        for e in child.events:
            key = (_text(e.get("file")), _text(e.get("test")))
            kind = e.get("event")
            if kind == "start":
                started.append(key)
            elif kind == "outcome":
                said[key] = (e.get("passed") is True, _text(e.get("message")))
            elif kind == "check":
                checks.setdefault(key, []).append(e)
            elif kind == "broken" and key[0]:
                broken[key[0]] = _text(e.get("error"))
        outcomes = {}
        for key in dict.fromkeys([*started, *said]):
            passed, message = said.get(key, (False, "stopped: " + why_stopped(child, limits)))
            if finished or key in said:
                recorded = checks.get(key, [])
                if pins is not None:
                    made = [[r.get("fixture"), r.get("case")] for r in recorded]
                    want = pins.get(f"{key[0]}::{key[1]}", [])
                    if made != want and passed:
                        passed, message = False, (f"the grader's comparisons did not run as they should "
                                                  f"({len(made)} made, {len(want)} expected): did your code change "
                                                  "the grader?")
                for record in recorded:
                    failure = self.verdict(record, child.out)
                    if failure is not None:
                        passed, message = False, failure if passed or not message else message
                        break
            outcomes[key] = (passed, message)
        if finished:
            missing = "not run: no such test in the grader"
        elif started:
            missing = f"not run: grading stopped at an earlier test ({started[-1][1]})"
        else:
            missing = "not run: " + why_stopped(child, limits).replace("during this test", "before any test ran")
        return outcomes, broken, missing


def tamper(outcomes: dict, example: str, count: int) -> tuple[dict, str]:
    """Every test of a child that changed files outside its own directory fails."""
    message = (f"your code changed or deleted files outside its own directory ({count} paths, e.g. {example}): "
               "this lab scores 0")
    return {key: (False, message) for key in outcomes}, message


def grade_isolated(base: Path, source: Path, labs: dict[int, Lab], hidden: Path | None = None,
                   limits: Limits = Limits(), pins: dict | None = None, starter: Path | None = None,
                   sandbox: Sandbox | None = None, workers: int = 1) -> tuple[list[Result], list[str]]:
    """Grade ``labs`` (number -> Lab) of the student's files in ``source`` on copies of ``base`` (the clean
    handout), each lab in a child (public graders first, every lab's hidden tests after; ``workers`` children
    at a time), judged here. ``pins``: per lab, test -> the comparisons it must make (lab/autograder.py records
    them on the reference).
    Returns the results and notes for the instructor."""
    sandbox = sandbox or sandbox_user()
    workers = workers if sandbox.uid is None else 1  # kill_user ends every process of the sandbox user
    notes = list(sandbox.notes)
    guarded = [path for path in (base, hidden) if path is not None]  # the grader's files: students may not touch
    with tempfile.TemporaryDirectory(prefix="lab_grader_") as private:
        # Everything this process needs is read or copied before any student code runs, so that a child
        # which manages to delete the grader's files (no unprivileged user) cannot stop the grading.
        judge = Judge(fixture_numbers(base))
        rubric, hidden_rubric = rubrics(base, hidden)
        clean = Path(private) / "base"
        for part in ("llama_min", "lab"):
            shutil.copytree(base / part, clean / part, ignore=SKIP)
        for script in base.glob("*.py"):
            shutil.copy2(script, clean / script.name)
        if (base / "data").is_dir():
            shutil.copytree(base / "data", clean / "data", ignore=SKIP)
        if hidden is not None:
            shutil.copytree(hidden, Path(private) / "hidden", ignore=SKIP)
            hidden = Path(private) / "hidden"
        if starter is not None and starter.is_dir():
            starter = clean / starter.relative_to(base) if starter.is_relative_to(base) else starter
        results: dict[tuple[int, bool], list[Result]] = {}
        for is_hidden in (False, True):  # every lab's public graders before any hidden test
            jobs = {}
            for number, lab in labs.items():
                files = grader_files(clean, [number], hidden, public=not is_hidden)
                if files:
                    lab_pins = None if pins is None else pins.get(str(number), {})
                    jobs[number, is_hidden] = (clean, source, lab, files, starter, lab_pins, limits, sandbox, judge,
                                               guarded, notes, (rubric, hidden_rubric))
            with ThreadPoolExecutor(max_workers=workers) as pool:
                done = {key: pool.submit(grade_one, *job) for key, job in jobs.items()}
                results.update({key: future.result() for key, future in done.items()})
    return [r for number in labs for h in (False, True) for r in results.get((number, h), [])], notes


def grade_one(base: Path, source: Path, lab: Lab, files: list, starter: Path | None, pins: dict | None,
              limits: Limits, sandbox: Sandbox, judge: Judge, guarded: list[Path], notes: list[str],
              points: tuple[dict, dict]) -> list[Result]:
    """One child: ``lab``'s public graders or its hidden tests (``files``), judged."""
    is_hidden = files[0][2]
    work = Path(tempfile.mkdtemp(prefix=f"lab{lab.number:02d}_"))
    try:
        missed = child_tree(base, source, lab, starter, work / "tree")
        notes += [] if is_hidden else [f"lab {lab.number}: {m}" for m in missed]
        if is_hidden:
            (work / "tree" / "hidden").mkdir()
            for _, path, _ in files:
                shutil.copy2(path, work / "tree" / "hidden" / path.name)
        before = fingerprint(*guarded)
        child = run_child(work, lab.number, is_hidden, limits, sandbox)
        outcomes, broken, missing = judge.outcomes(child, limits, pins)
        if not any(e.get("event") == "outcome" for e in child.events):
            notes.append(f"lab {lab.number}{' (hidden tests)' if is_hidden else ''}: no test ran; the child's "
                         f"output ends with:\n{child.log[-1500:]}")
        changed = sorted(set(before.items()) ^ set(fingerprint(*guarded).items()))
        if changed:
            outcomes, missing = tamper(outcomes, changed[0][0], len(changed))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    expected = {}
    for key in pins or {}:
        file, _, test = key.partition("::")
        expected.setdefault(file, []).append(test)
    return [r for r in score([lab.number], files, outcomes, broken, *points, expected, missing)
            if r.hidden == is_hidden]
