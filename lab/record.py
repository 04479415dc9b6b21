"""The child side of isolated grading (lab/isolate.py starts it; nobody runs it by hand): run one lab's graders,
or its hidden tests, on the student's code in the current directory, and write down as plain data what
happened, for a process that never imports the student's code to judge.

    python -m lab.record --lab N --out DIR [--hidden DIR] [--memory-mb M] [--cpu-s S]

DIR/events.jsonl gets one JSON object a line, flushed as it happens, so that a child killed halfway (a time
limit, ``os._exit``) leaves every finished test behind:

    {"event": "start", "file": F, "test": T}                    a test begins
    {"event": "check", "file": F, "test": T, "index": I, "fixture": N, "case": C, "what": W, "parts": [...],
     "tuple": bool}                                             the test compared an output with case C of
                                                                labNN's fixtures; the output is DIR/checkI.safetensors
    {"event": "outcome", "file": F, "test": T, "passed": bool, "message": M}
    {"event": "broken", "file": F, "error": E}                  a test file failed to load
    {"event": "done"}

Nothing here is trusted: the student's code runs in this process and can rewrite any of it. The judge re-runs
every recorded comparison itself, on the saved outputs, against its own copy of the fixtures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
from pathlib import Path

OUTPUT_LIMIT = 256 * 2 ** 20  # bytes any one file the child writes may reach


def limit(memory_mb: int, cpu_s: int, processes: int | None = None) -> None:
    """Lower this process's limits for good: an unprivileged process cannot raise a hard limit again.
    ``processes`` counts every process and thread of this user, so it is set only for a user of its own."""
    limits = [(resource.RLIMIT_AS, memory_mb * 2 ** 20), (resource.RLIMIT_CPU, cpu_s),
              (resource.RLIMIT_FSIZE, OUTPUT_LIMIT), (resource.RLIMIT_CORE, 0)]
    for which, value in limits + ([(resource.RLIMIT_NPROC, processes)] if processes else []):
        _, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))


class Recorder:
    def __init__(self, out: Path):
        self.out = out
        self.file = open(out / "events.jsonl", "a", encoding="utf-8", buffering=1)
        self.test: tuple[str, str] = ("", "")
        self.counter = itertools.count()

    def write(self, **event) -> None:
        self.file.write(json.dumps(event) + "\n")
        self.file.flush()

    def save(self, got, case, what) -> None:
        """Save ``got`` (a tensor, or a tuple of them) as plain tensors, and what it was compared with."""
        import torch
        from safetensors.torch import save_file

        index = next(self.counter)
        parts = tuple(got) if isinstance(got, (tuple, list)) else (got,)
        tensors, kinds = {}, []
        for i, part in enumerate(parts):
            if isinstance(part, torch.Tensor):
                tensors[str(i)] = part.detach().as_subclass(torch.Tensor).cpu().contiguous().clone()
                kinds.append("tensor")
            else:
                kinds.append(type(part).__name__)
        try:
            save_file(tensors, str(self.out / f"check{index}.safetensors"))
        except Exception:  # a dtype safetensors cannot store, say: the judge finds no file and fails the check
            kinds = ["unsaved"] * len(parts)
        self.write(event="check", file=self.test[0], test=self.test[1], index=index,
                   fixture=getattr(case, "fixture", None), case=case.name, what=str(what)[:500], parts=kinds,
                   tuple=isinstance(got, (tuple, list)))


def install(recorder: Recorder) -> None:
    """Make every grader's ``check`` save what it compares, and every fixture case know its lab. This runs
    before pytest imports a grader, so ``from lab.graders.check import check`` binds the recording one."""
    from lab.graders import check as checks

    compare, make_case, load = checks.check, checks.LabFixtures.case, checks.LabFixtures.__init__

    def recording_check(got, case, what):
        __tracebackhide__ = True
        recorder.save(got, case, what)
        compare(got, case, what)

    def numbered_init(self, number, *args, **kwargs):
        load(self, number, *args, **kwargs)
        self.number = number

    def numbered_case(self, name):
        case = make_case(self, name)
        case.fixture = getattr(self, "number", None)
        return case

    checks.check = recording_check
    checks.LabFixtures.__init__ = numbered_init
    checks.LabFixtures.case = numbered_case


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lab.record", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lab", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--hidden", type=Path, help="run this directory's hidden tests of the lab, not its grader")
    parser.add_argument("--memory-mb", type=int, default=4096)
    parser.add_argument("--cpu-s", type=int, default=300)
    parser.add_argument("--processes", type=int, help="at most this many processes and threads of this user")
    args = parser.parse_args(argv)
    limit(args.memory_mb, args.cpu_s, args.processes)
    import pytest

    from .grade import Collector, grader_files, run_pytest

    recorder = Recorder(args.out)
    install(recorder)

    class Recording(Collector):
        @pytest.hookimpl(tryfirst=True)
        def pytest_runtest_setup(self, item):
            recorder.test = (Path(item.path).name, item.nodeid.partition("::")[2])
            recorder.write(event="start", file=recorder.test[0], test=recorder.test[1])

        def on_outcome(self, key, outcome):
            recorder.write(event="outcome", file=key[0], test=key[1], passed=outcome[0], message=outcome[1])

        def pytest_collectreport(self, report):
            super().pytest_collectreport(report)
            name = Path(report.fspath).name
            if name in self.broken:
                recorder.write(event="broken", file=name, error=self.broken[name])

    root = Path.cwd()
    files = grader_files(root, [args.lab], args.hidden, public=args.hidden is None)
    run_pytest(root, [path for _, path, _ in files], Recording())
    recorder.write(event="done")


if __name__ == "__main__":
    main()
