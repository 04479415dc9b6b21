"""Make a student version of the repository: a fresh directory (no git history) holding what a student needs,
with the bodies of the chosen labs' functions replaced by ``raise NotImplementedError("<what to write>")``.

    python -m lab.handout --labs 3 4 --out DIR         # blank labs 3 and 4 (any subset; `all` for every lab)
    python -m lab.handout --fill DIR                    # paste this repository's reference back into DIR

A handout holds the package, train.py, generate.py, the shipped data (Shakespeare; the word tasks of labs 7
and 8), the chosen labs' handouts, every lab's grader with its stored reference outputs, the grade, pack and
leaderboard tools, the plot scripts and the experiments page with its reference curves. It holds no
tests/ (they contain the reference formulas), none of the instructor's tools (this generator, the fixture
script, the mutation catalogue) and no history. DIR/lab/handout.json records which labs are blanked.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .leaks import duplicated_answers
from .manifest import REPO, STARTER, Lab, choose_labs, load_labs
from .source import blank_function, replace_function

# What a student version holds, relative to the repository root.
PACKAGE = "llama_min"
SCRIPTS = ("train.py", "generate.py")
DATA = ("data/shakespeare", "data/word_tasks")  # the pretraining text; the task set of labs 7 and 8
LAB_FILES = ("__init__.py", "manifest.py", "manifest.toml", "grade.py", "isolate.py", "record.py", "autograder.py",
             "rubric.toml", "pack.py", "leaderboard.py", "experiments.md")
LAB_DIRS = ("graders", "fixtures", "plots", "curves")  # curves: the reference plots of experiments.md
RECORD = "lab/handout.json"


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache"))


def check_out(out: Path, repo: Path) -> None:
    """Refuse an ``out`` that is not empty or that lies inside what a handout copies (the copy would copy
    itself)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; choose a new directory for the handout")
    target = out.resolve()
    for part in (repo, repo / PACKAGE, *(repo / d for d in DATA), repo / "lab"):
        if target == part.resolve() or (part != repo and target.is_relative_to(part.resolve())):
            raise ValueError(f"--out {out} is inside {part}, which the handout copies; choose a directory outside it")


def write_handout(labs: list[Lab], out: Path, repo: Path = REPO) -> list[str]:
    """Write the student version with ``labs`` blanked into ``out`` (which must not exist or be empty): into a
    temporary directory beside it, renamed to ``out`` once complete, so that a failure (a full disk) leaves
    nothing behind. Returns notes for the instructor: other labs' functions that would give a blanked lab's
    answer away."""
    out = Path(out)
    check_out(out, repo)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        fill_directory(labs, work, repo)
        work.chmod(0o755)
        os.rename(work, out)  # replaces an empty directory, fails on one that filled meanwhile
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    blanked = {b.name for lab in labs for b in lab.blanks}
    return [f"lab {lab.number}'s answer can be read in {name}, which this handout keeps: blank its lab too to hide it"
            for lab in labs for name in lab.also_shows if name not in blanked] + duplicated_answers(repo, labs)


def fill_directory(labs: list[Lab], out: Path, repo: Path) -> None:
    """The handout's files, written into the existing empty directory ``out``."""
    copy_tree(repo / PACKAGE, out / PACKAGE)
    for script in SCRIPTS:
        shutil.copy2(repo / script, out / script)
    for data in DATA:
        copy_tree(repo / data, out / data)
    shutil.copy2(repo / ".gitignore", out / ".gitignore")
    pyproject = (repo / "pyproject.toml").read_text(encoding="utf-8")
    (out / "pyproject.toml").write_text(pyproject.replace('testpaths = ["tests"]', 'testpaths = ["lab/graders"]'),
                                        encoding="utf-8")
    (out / "lab").mkdir()
    for name in LAB_FILES:
        shutil.copy2(repo / "lab" / name, out / "lab" / name)
    for name in LAB_DIRS:
        copy_tree(repo / "lab" / name, out / "lab" / name)
    for lab in labs:
        shutil.copy2(repo / "lab" / lab.handout, out / "lab" / lab.handout)
        for blank in lab.blanks:
            path = out / blank.file
            path.write_text(blank_function(path.read_text(encoding="utf-8"), blank.qualname,
                                           f"Lab {lab.number} ({lab.title}): {blank.todo}"), encoding="utf-8")
    # The blanked files as handed out: lab.grade grades each lab with every other lab's files as they are
    # here, so that one lab's broken file cannot fail another lab.
    for file in sorted({f for lab in labs for f in lab.files}):
        (out / STARTER / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / file, out / STARTER / file)
    (out / RECORD).write_text(json.dumps({"labs": [lab.number for lab in labs], "source_commit": source_commit(repo)},
                                         indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(student_readme(labs), encoding="utf-8")


def fill_handout(out: Path, repo: Path = REPO) -> list[str]:
    """Paste the reference bodies of every function the handout in ``out`` blanked back from ``repo``.
    Returns the files changed."""
    labs = choose_labs(blanked_labs(out), load_labs())
    changed = []
    for lab in labs:
        for blank in lab.blanks:
            path = out / blank.file
            path.write_text(replace_function(path.read_text(encoding="utf-8"), blank.qualname,
                                             (repo / blank.file).read_text(encoding="utf-8")), encoding="utf-8")
            changed.append(blank.file)
    return sorted(set(changed))


def blanked_labs(root: Path) -> list[int]:
    """The labs a handout blanks, from its lab/handout.json (empty for the reference repository)."""
    path = Path(root) / RECORD
    return json.loads(path.read_text())["labs"] if path.exists() else []


def source_commit(repo: Path) -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def student_readme(labs: list[Lab]) -> str:
    rows = "\n".join(f"| {lab.number} | [{lab.title}](lab/{lab.handout}) | "
                     + ", ".join(f"`{b.name}`" for b in lab.blanks) + " |" for lab in labs)
    return f"""# llama_min: course labs

A minimal LLaMA in PyTorch in which some functions are left for you to write. Each lab's handout gives the
equations, the shapes, the functions and the command that grades them.

| lab | handout | functions to write |
|---|---|---|
{rows}

Set up once: `pip install torch numpy sentencepiece safetensors pytest matplotlib` (a CPU build of PyTorch is
enough). Then, from this directory:

    python -m lab.grade --lab N          # grade one lab: a score table, and what went wrong
    python -m lab.grade                  # every lab
    python -m lab.pack                   # submission.zip: your edited files and your hand-in files

Every other part of the model is complete and correct, so each lab can be graded on its own.
"""


def main(argv: list[str] | None = None) -> None:
    labs = load_labs()
    parser = argparse.ArgumentParser(prog="python -m lab.handout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--labs", nargs="+", help="lab numbers to blank, or `all`: "
                        + ", ".join(f"{n} {lab.title}" for n, lab in labs.items()))
    parser.add_argument("--out", type=Path, help="directory to write the student version into (new or empty)")
    parser.add_argument("--fill", type=Path, metavar="DIR", help="paste the reference back into the handout in DIR")
    args = parser.parse_args(argv)
    try:
        if args.fill:
            if args.labs or args.out:
                raise ValueError("--fill DIR takes no --labs or --out: it restores what DIR/lab/handout.json says")
            changed = fill_handout(args.fill)
            print(f"pasted the reference back into {len(changed)} files of {args.fill}: {', '.join(changed)}")
            return
        if not args.labs or not args.out:
            raise ValueError("give --labs N [N ...] (or `all`) and --out DIR")
        if args.labs != ["all"] and not all(n.isdigit() for n in args.labs):
            raise ValueError(f"--labs takes lab numbers or `all`, got {' '.join(args.labs)}")
        numbers = list(labs) if args.labs == ["all"] else [int(n) for n in args.labs]
        chosen = choose_labs(numbers, labs)
        notes = write_handout(chosen, args.out)
    except (ValueError, FileExistsError, LookupError) as e:
        print(f"lab.handout: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as e:
        print(f"lab.handout: error: could not write {args.out}: {e.strerror or e}; nothing was written", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"wrote the student version of labs {', '.join(str(lab.number) for lab in chosen)} to {args.out}")
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
