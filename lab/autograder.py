"""A Gradescope autograder for the labs: the zip to upload, the program ``run_autograder`` starts, and a local
dry run of the whole thing without Docker.

    python -m lab.pack --autograder --lab 3 --lab 4 --hidden lab/hidden_examples    # autograder.zip
    python -m lab.pack --autograder --lab 3 --dry-run submission.zip                 # what Gradescope would say

The zip follows Gradescope's documented layout (gradescope-autograders.readthedocs.io, "Autograder
Specifications"): ``setup.sh`` and ``run_autograder`` at its top, unpacked into /autograder/source; the
student's upload unpacked into /autograder/submission; the results written to
/autograder/results/results.json. Besides them it holds ``handout/`` (the student version of the graded labs:
no reference code, with the graders and the stored reference outputs), ``hidden/`` (the instructor's hidden
tests, if any) and ``config.json`` (the labs, the limits, and the comparisons each test makes on the reference,
recorded here so that a child which skips them fails).

``run_autograder`` runs ``python3 -m lab.autograder --root /autograder`` in ``source/handout``: lab/isolate.py
grades each lab in a child process as an unprivileged user, and this process, which never imports the
student's code, judges and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from .manifest import REPO, choose_labs, load_labs

TORCH = "torch==2.13.0"  # the version CI tests; the CPU wheel, as a Gradescope machine has no GPU
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
ROOT_ENV = "LAB_AUTOGRADER_ROOT"  # where /autograder is (the dry run points it at a temporary directory)
ZIP_COMMENT = b"llama_min lab.pack autograder"

SETUP = f"""#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder's image (Ubuntu).
set -euo pipefail
apt-get update -q && apt-get install -y -q python3 python3-pip
pip3 install -q {TORCH} --index-url {TORCH_INDEX}
# the handout's own dependencies (pyproject.toml), the graders' pytest, tomli for Python 3.10
pip3 install -q /autograder/source/handout pytest "tomli; python_version < '3.11'"
# the unprivileged user the students' code runs as (lab/isolate.py)
id -u labstudent >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin labstudent
"""

RUN = f"""#!/usr/bin/env bash
# Gradescope runs this, as root, for every submission: grade it and write results/results.json.
set -u
root="${{{ROOT_ENV}:-/autograder}}"
cd "$root/source/handout" && exec "${{LAB_PYTHON:-python3}}" -m lab.autograder --root "$root"
"""


def safe_zip_out(out: Path, comment: bytes, protected: list[Path]) -> None:
    """Refuse to write a zip over anything this tool did not write: a file that is not a .zip, one inside
    ``protected`` directories, or an existing file that is not a zip this tool wrote (``comment``)."""
    target = out.resolve()
    if out.suffix != ".zip":
        raise ValueError(f"--out {out}: the name must end in .zip")
    for place in protected:
        if target.is_relative_to(place.resolve()):
            raise ValueError(f"--out {out} is inside {place}; write the zip outside the code it packs")
    if out.exists() or out.is_symlink():
        ours = out.is_file() and not out.is_symlink() and zipfile.is_zipfile(out)
        if ours:
            with zipfile.ZipFile(out) as z:
                ours = z.comment == comment
        if not ours:
            raise FileExistsError(f"{out} exists and is not a zip this tool wrote; remove it or choose another --out")


def write_zip(out: Path, files: dict[str, Path], comment: bytes, executable: tuple[str, ...] = ()) -> None:
    """Zip ``files`` (name in the zip -> file) into ``out`` whole or not at all: a temporary file beside it,
    renamed over it once complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    try:
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.comment = comment
            for name, path in files.items():
                info = zipfile.ZipInfo.from_file(path, name)
                info.compress_type = zipfile.ZIP_DEFLATED
                mode = 0o755 if name in executable else 0o644
                info.external_attr = (stat.S_IFREG | mode) << 16
                z.writestr(info, path.read_bytes())
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)


def build(labs: list[int], out: Path, hidden: Path | None = None, time_s: float = 300.0, memory_mb: int = 4096,
          repo: Path = REPO) -> list[str]:
    """Write the autograder zip for ``labs`` to ``out``. The reference is graded first (with the hidden tests):
    every test must pass on it, and the comparisons each test makes are recorded. Returns notes."""
    from .grade import hidden_files
    from .handout import write_handout

    manifest = load_labs(repo / "lab" / "manifest.toml")
    chosen = choose_labs(labs, manifest)
    safe_zip_out(out, ZIP_COMMENT, [repo / "llama_min", repo / "lab"])
    hidden_files(hidden)  # a misnamed hidden test is an error now, not on Gradescope
    with tempfile.TemporaryDirectory(prefix="lab_autograder_") as tmp:
        tmp = Path(tmp)
        notes = write_handout(chosen, tmp / "source" / "handout", repo)
        write_handout([], tmp / "reference", repo)
        if hidden is not None:
            (tmp / "source" / "hidden").mkdir()
            for path in sorted(Path(hidden).glob("test_*.py")) + sorted(Path(hidden).glob("rubric.toml")):
                shutil.copy2(path, tmp / "source" / "hidden" / path.name)
        pins, failed = record_pins(tmp / "reference", {lab.number: lab for lab in chosen},
                                   tmp / "source" / "hidden" if hidden is not None else None)
        if failed:
            raise ValueError("the reference fails these tests, so no student could pass them: "
                             + "; ".join(failed))
        config = {"labs": [lab.number for lab in chosen], "time_limit_s": time_s, "memory_mb": memory_mb,
                  "pins": pins}
        (tmp / "source" / "config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
        (tmp / "source" / "setup.sh").write_text(SETUP, encoding="utf-8")
        (tmp / "source" / "run_autograder").write_text(RUN, encoding="utf-8")
        source = tmp / "source"
        files = {p.relative_to(source).as_posix(): p for p in sorted(source.rglob("*"))
                 if p.is_file() and "__pycache__" not in p.parts}
        write_zip(out, files, ZIP_COMMENT, executable=("setup.sh", "run_autograder"))
    return notes


def record_pins(reference: Path, labs: dict, hidden: Path | None) -> tuple[dict, list[str]]:
    """Grade the reference in children and keep, per lab and test, the comparisons it made (which fixture,
    which case); also the tests that failed on it."""
    from .grade import grader_files
    from .isolate import Judge, Limits, Sandbox, child_tree, fixture_numbers, run_child

    pins, failed = {}, []
    judge = Judge(fixture_numbers(reference))
    for number, lab in labs.items():
        pins[str(number)] = {}
        for is_hidden in (False, True):
            files = grader_files(reference, [number], hidden, public=not is_hidden)
            if not files:
                continue
            with tempfile.TemporaryDirectory(prefix=f"lab{number:02d}_reference_") as work:
                work = Path(work)
                child_tree(reference, reference, lab, None, work / "tree")
                if is_hidden:
                    (work / "tree" / "hidden").mkdir()
                    for _, path, _ in files:
                        shutil.copy2(path, work / "tree" / "hidden" / path.name)
                child = run_child(work, number, is_hidden, Limits(), Sandbox())
                outcomes, broken, _ = judge.outcomes(child, Limits(), None)
            failed += [f"lab {number} {name}: {error.splitlines()[0] if error else 'failed to load'}"
                       for name, error in broken.items()]
            failed += [f"lab {number} {test}: {message.splitlines()[0] if message else 'failed'}"
                       for (file, test), (passed, message) in outcomes.items() if not passed]
            for event in child.events:
                if event.get("event") == "start":
                    pins[str(number)].setdefault(f"{event['file']}::{event['test']}", [])
                if event.get("event") == "check":
                    pins[str(number)].setdefault(f"{event['file']}::{event['test']}", []).append(
                        [event.get("fixture"), event.get("case")])
            if not any(e.get("event") == "done" for e in child.events):
                failed.append(f"lab {number}: the grading of the reference did not finish:\n{child.log}")
    return pins, failed


def run(root: Path) -> dict:
    """What ``run_autograder`` does: grade root/submission with root/source, write root/results/results.json."""
    from .grade import gradescope, write_json
    from .isolate import Limits, grade_isolated

    start = time.time()
    source = root / "source"
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    handout = source / "handout"
    manifest = load_labs(handout / "lab" / "manifest.toml")
    hidden = source / "hidden" if (source / "hidden").is_dir() else None
    if hidden is not None and os.geteuid() == 0:
        hidden.chmod(0o700)  # root's alone: the unprivileged child gets its own copy only after the public graders
    labs = {n: manifest[n] for n in config["labs"]}
    results, notes = grade_isolated(handout, root / "submission", labs, hidden,
                                    Limits(config["time_limit_s"], config["memory_mb"]), config["pins"])
    data = gradescope(results, time.time() - start, {n: lab.title for n, lab in manifest.items()})
    write_json(root / "results" / "results.json", data)
    for note in notes:  # run_autograder's output: students do not see it (stdout_visibility "hidden")
        print(f"note: {note}")
    return data


def unpack(submission: Path, dest: Path) -> None:
    """Lay out ``submission`` (a zip or a directory) in ``dest`` the way Gradescope does: a zip's members by
    their names (never outside ``dest``), a directory's regular files (no links)."""
    dest.mkdir(parents=True)
    if submission.is_dir():
        for path in sorted(submission.rglob("*")):
            if path.is_file() and not path.is_symlink():
                (dest / path.relative_to(submission)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest / path.relative_to(submission))
        return
    if not zipfile.is_zipfile(submission):
        raise ValueError(f"{submission}: a submission is a zip (python -m lab.pack) or a directory")
    with zipfile.ZipFile(submission) as z:
        for info in z.infolist():
            target = (dest / info.filename).resolve()
            if info.is_dir() or not target.is_relative_to(dest.resolve()):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(info))


def dry_run(submission: Path, labs: list[int], hidden: Path | None = None, time_s: float = 300.0,
            memory_mb: int = 4096, built: Path | None = None) -> dict:
    """Build the autograder (or take the zip ``built``), lay out /autograder in a temporary directory with
    ``submission`` in it, and run its ``run_autograder`` there with this Python. No Docker and no setup.sh:
    the packages are this environment's. Returns the results JSON."""
    with tempfile.TemporaryDirectory(prefix="lab_dry_run_") as tmp:
        root = Path(tmp) / "autograder"
        root.mkdir()
        Path(tmp).chmod(0o755)
        root.chmod(0o755)  # as /autograder: the unprivileged child may read the handout's data
        if built is None:
            built = Path(tmp) / "autograder.zip"
            build(labs, built, hidden, time_s, memory_mb)
        with zipfile.ZipFile(built) as z:
            z.extractall(root / "source")
        for name in ("run_autograder", "setup.sh"):
            (root / "source" / name).chmod(0o755)
        unpack(submission, root / "submission")
        (root / "results").mkdir()
        env = {**os.environ, ROOT_ENV: str(root), "LAB_PYTHON": sys.executable}
        subprocess.run(["bash", str(root / "source" / "run_autograder")], env=env, check=True)
        return json.loads((root / "results" / "results.json").read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lab.autograder", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="Gradescope's /autograder")
    args = parser.parse_args(argv)
    data = run(args.root)
    print(data["output"])


if __name__ == "__main__":
    main()
