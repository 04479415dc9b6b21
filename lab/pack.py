"""Bundle a submission: the source files a student edited for the labs of this handout and the hand-in files
(plots, answers), in one zip whose paths are the repository's, so that unzipping it over a fresh handout
gives the student's version.

    python -m lab.pack                        # the labs this handout blanks (lab/handout.json)
    python -m lab.pack --labs 3 4 --out my_submission.zip

A hand-in file that is missing is named, and the zip is written without it.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

from .manifest import choose_labs, load_labs

RECORD = "lab/handout.json"


def pack(root: Path, labs: list[int], out: Path) -> tuple[list[str], list[str]]:
    """Write the zip; returns (the files packed, the hand-in files missing)."""
    manifest = load_labs(root / "lab" / "manifest.toml")
    chosen = choose_labs(labs, manifest)
    wanted = [RECORD] if (root / RECORD).is_file() else []
    wanted += [f for lab in chosen for f in lab.files] + [f for lab in chosen for f in lab.handin]
    wanted = list(dict.fromkeys(wanted))
    present = [f for f in wanted if (root / f).is_file()]
    missing = [f for f in wanted if f not in present]
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for f in present:
            z.write(root / f, f)
    return present, missing


def main(argv: list[str] | None = None) -> None:
    import json

    root = Path.cwd()
    parser = argparse.ArgumentParser(prog="python -m lab.pack", description=__doc__.split("\n\n")[0])
    parser.add_argument("--labs", type=int, nargs="+", help="labs to pack (default: those lab/handout.json lists)")
    parser.add_argument("--out", type=Path, default=Path("submission.zip"))
    args = parser.parse_args(argv)
    labs = args.labs or (json.loads((root / RECORD).read_text())["labs"] if (root / RECORD).is_file() else None)
    if not labs:
        raise SystemExit("lab.pack: error: no labs to pack: pass --labs N [N ...] (or run it in a handout, whose "
                         f"{RECORD} lists them)")
    try:
        present, missing = pack(root, labs, args.out)
    except ValueError as e:
        raise SystemExit(f"lab.pack: error: {e}") from None
    print(f"wrote {args.out}: {len(present)} files\n" + "\n".join(f"  {f}" for f in present))
    if missing:
        print("missing (not packed; see the handouts for what to hand in):\n" + "\n".join(f"  {f}" for f in missing),
              file=sys.stderr)


if __name__ == "__main__":
    main()
