"""Bundle a submission: the source files a student edited for the labs of this handout and the hand-in files
(plots, answers), in one zip whose paths are the repository's. Or, for the instructor, build the Gradescope
autograder (lab/autograder.py) and try it on a submission.

    python -m lab.pack                        # the labs this handout blanks (lab/handout.json)
    python -m lab.pack --labs 3 4 --out my_submission.zip
    python -m lab.pack --autograder --lab 3 --lab 4 [--hidden DIR]          # autograder.zip (--lab all: every lab)
    python -m lab.pack --autograder --lab 3 --dry-run submission.zip          # grade it as Gradescope would
    python -m lab.pack --autograder --dry-run submission.zip --zip autograder.zip    # ... with a zip built before

A hand-in file that is missing is named, and the zip is written without it. The zip is written whole or not at
all, and never over a file this tool did not write.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .autograder import build, dry_run, safe_zip_out, write_zip
from .manifest import choose_labs, load_labs

RECORD = "lab/handout.json"
ZIP_COMMENT = b"llama_min lab.pack submission"


def pack(root: Path, labs: list[int], out: Path) -> tuple[list[str], list[str]]:
    """Write the zip; returns (the files packed, the hand-in files missing)."""
    manifest = load_labs(root / "lab" / "manifest.toml")
    chosen = choose_labs(labs, manifest)
    safe_zip_out(out, ZIP_COMMENT, [root / "llama_min", root / "lab"])
    wanted = [RECORD] if (root / RECORD).is_file() else []
    wanted += [f for lab in chosen for f in lab.files] + [f for lab in chosen for f in lab.handin]
    wanted = list(dict.fromkeys(wanted))
    # only files inside the handout: a hand-in that is a link to elsewhere is not packed
    present = [f for f in wanted if (root / f).is_file() and (root / f).resolve().is_relative_to(root.resolve())]
    missing = [f for f in wanted if f not in present]
    write_zip(out, {f: root / f for f in present}, ZIP_COMMENT)
    return present, missing


def lab_numbers(values: list[str] | None, manifest) -> list[int] | None:
    if not values:
        return None
    if values == ["all"]:
        return list(manifest)
    if not all(v.isdigit() for v in values):
        raise ValueError(f"--lab takes lab numbers or `all`, got {' '.join(values)}")
    return [int(v) for v in values]


def main(argv: list[str] | None = None) -> None:
    root = Path.cwd()
    parser = argparse.ArgumentParser(prog="python -m lab.pack", description=__doc__.split("\n\n")[0])
    parser.add_argument("--labs", type=int, nargs="+", help="labs to pack (default: those lab/handout.json lists)")
    parser.add_argument("--out", type=Path, help="the zip (default: submission.zip, or autograder.zip)")
    group = parser.add_argument_group("the autograder (instructors, in the reference repository)")
    group.add_argument("--autograder", action="store_true", help="build the Gradescope autograder zip")
    group.add_argument("--lab", action="append", help="a lab it grades (repeatable), or `all`")
    group.add_argument("--hidden", type=Path, help="a directory of hidden tests test_labNN_*.py (and rubric.toml)")
    group.add_argument("--time-limit", type=float, default=300.0, help="seconds per lab and child (default 300)")
    group.add_argument("--memory-mb", type=int, default=4096, help="memory per child in MB (default 4096)")
    group.add_argument("--dry-run", type=Path, metavar="SUBMISSION",
                       help="run the autograder here on SUBMISSION (a zip or a directory) instead of writing it")
    group.add_argument("--json", type=Path, help="with --dry-run: also write the results JSON here")
    group.add_argument("--zip", type=Path, help="with --dry-run: try this autograder zip instead of building one")
    args = parser.parse_args(argv)
    try:
        if args.autograder:
            autograder(args)
            return
        if args.lab or args.hidden or args.dry_run:
            raise ValueError("--lab, --hidden and --dry-run go with --autograder (a student packs with --labs)")
        labs = args.labs or (json.loads((root / RECORD).read_text())["labs"] if (root / RECORD).is_file() else None)
        if not labs:
            raise ValueError("no labs to pack: pass --labs N [N ...] (or run it in a handout, whose "
                             f"{RECORD} lists them)")
        out = args.out or Path("submission.zip")
        present, missing = pack(root, labs, out)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        raise SystemExit(f"lab.pack: error: {e}") from None
    print(f"wrote {out}: {len(present)} files\n" + "\n".join(f"  {f}" for f in present))
    if missing:
        print("missing (not packed; see the handouts for what to hand in):\n" + "\n".join(f"  {f}" for f in missing),
              file=sys.stderr)


def autograder(args) -> None:
    from .grade import write_json

    manifest = load_labs()
    labs = lab_numbers(args.lab, manifest)
    if labs is None and not (args.dry_run and args.zip):
        raise ValueError("--autograder needs the labs it grades: --lab N (repeatable) or --lab all")
    if args.dry_run is None:
        out = args.out or Path("autograder.zip")
        notes = build(labs, out, args.hidden, args.time_limit, args.memory_mb)
        print(f"wrote {out}: upload it as the autograder of a Gradescope programming assignment (labs "
              f"{', '.join(map(str, labs))}; the student uploads the submission.zip of python -m lab.pack)")
        for note in notes:
            print(f"note: {note}")
        return
    if not args.dry_run.exists():
        raise FileNotFoundError(f"--dry-run {args.dry_run}: no such submission")
    data = dry_run(args.dry_run, labs, args.hidden, args.time_limit, args.memory_mb, args.zip)
    if args.json:
        write_json(args.json, data)
    print(f"score {data['score']:g} of {sum(t['max_score'] for t in data['tests']):g}")


if __name__ == "__main__":
    main()
