"""The course leaderboard: rank submissions by held-out bits per byte on the Shakespeare plays train.py holds
out (data/shakespeare/val.txt: Macbeth and The Tempest); lower is better.

    python -m lab.leaderboard --entry out/lab06 --name "Ada L." --out ada.json   # an entry from a train.py run
    python -m lab.leaderboard entries/*.json                                     # the ranking, as a table

An entry is one JSON object in a file of its own:

    {"name": "Ada L.", "val_bpb": 2.7417, "step": 200, "elapsed_s": 949.4, "eval_tokens": 131072}

- name: who submits (text, unique on the board);
- val_bpb: held-out bits per byte, the last value train.py wrote to OUT_DIR/metrics.jsonl (a number > 0);
- step: the optimiser steps of the run (an integer >= 1); elapsed_s: its wall time in seconds (>= 0);
- eval_tokens: optional, the run's --eval_tokens (the default, 131072, covers the whole held-out split of
  75,043 tokens; a smaller one scores a part of it, so the board shows it); command: optional, how it trained.
`--entry OUT_DIR` writes one from a run's metrics.jsonl (and eval_tokens from OUT_DIR/ckpt/train_state.pt),
so the figure is train.py's own. Ties in val_bpb
go to the run with fewer steps. A file that is not such an entry stops the ranking with a one-line error
naming the file and the field.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

FIELDS = {"name": str, "val_bpb": float, "step": int, "elapsed_s": float}
OPTIONAL = {"eval_tokens": int, "command": str}


def read_entry(path: Path) -> dict:
    """The entry in ``path``, checked field by field; ValueError naming the file and what is wrong."""
    try:
        entry = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: expected one JSON object with {', '.join(FIELDS)}, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(FIELDS) - set(OPTIONAL))
    if unknown:
        raise ValueError(f"{path}: unknown fields {unknown}; an entry has {', '.join([*FIELDS, *OPTIONAL])}")
    for field, kind in {**FIELDS, **OPTIONAL}.items():
        if field not in entry:
            if field in FIELDS:
                raise ValueError(f"{path}: missing field {field!r} (python -m lab.leaderboard --entry OUT_DIR writes "
                                 "every field)")
            continue
        value = entry[field]
        ok = (isinstance(value, str) and value.strip() if kind is str else
              isinstance(value, int) and not isinstance(value, bool) and value >= 1 if kind is int else
              isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and (value > 0 if field == "val_bpb" else value >= 0))
        if not ok:
            wanted = {str: "non-empty text", int: "an integer >= 1"}.get(kind) or (
                "a number > 0" if field == "val_bpb" else "a number >= 0")
            raise ValueError(f"{path}: {field} is {json.dumps(value)}; expected {wanted}")
    return entry


def rank(paths: list[Path]) -> list[dict]:
    """The entries of ``paths``, best (lowest val_bpb, then fewest steps) first; one name once only."""
    entries, seen = [], {}
    for path in paths:
        entry = read_entry(path)
        if entry["name"] in seen:
            raise ValueError(f"{path}: name {entry['name']!r} is already on the board ({seen[entry['name']]}); "
                             "one entry per name")
        seen[entry["name"]] = path
        entries.append(entry)
    return sorted(entries, key=lambda e: (e["val_bpb"], e["step"]))


def entry_from_run(out_dir: Path, name: str) -> dict:
    """An entry from a train.py run: the last held-out bits per byte in OUT_DIR/metrics.jsonl."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} does not exist; pass the --out_dir of a train.py run on the Shakespeare data")
    last = None
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("val_bpb") is not None:
            last = record
    if last is None:
        raise ValueError(f"{path} holds no held-out bits per byte: train on text data (not instructions) and let "
                         "the run reach an evaluation (--eval_every)")
    entry = {"name": name, "val_bpb": round(last["val_bpb"], 6), "step": last["step"],
             "elapsed_s": round(last["elapsed_s"], 1)}
    state = Path(out_dir) / "ckpt" / "train_state.pt"
    if state.is_file():
        import torch

        config = torch.load(state, map_location="cpu", weights_only=True).get("train_config") or {}
        if isinstance(config.get("eval_tokens"), int):
            entry["eval_tokens"] = config["eval_tokens"]
    return entry


def table(entries: list[dict]) -> str:
    lines = [f"{'rank':<6}{'name':<28}{'bits/byte':>10}{'steps':>8}{'time':>10}{'eval tokens':>13}"]
    for i, e in enumerate(entries, 1):
        lines.append(f"{i:<6}{e['name'][:27]:<28}{e['val_bpb']:>10.4f}{e['step']:>8}{e['elapsed_s']:>9.0f}s"
                     f"{e.get('eval_tokens', '?'):>13}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lab.leaderboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="entry files to rank")
    parser.add_argument("--entry", type=Path, metavar="OUT_DIR", help="write an entry from this train.py run instead")
    parser.add_argument("--name", help="--entry: the name on the board")
    parser.add_argument("--out", type=Path, help="--entry: the file to write (default: print it)")
    args = parser.parse_args(argv)
    try:
        if args.entry:
            if not args.name or not args.name.strip():
                raise ValueError("--entry needs --name, the name on the board")
            text = json.dumps(entry_from_run(args.entry, args.name.strip()), indent=1) + "\n"
            if args.out:
                args.out.write_text(text, encoding="utf-8")
                print(f"wrote {args.out}")
            else:
                sys.stdout.write(text)
            return
        if not args.files:
            raise ValueError("give the entry files to rank (or --entry OUT_DIR --name NAME to make one)")
        print(table(rank(args.files)))
    except ValueError as e:
        raise SystemExit(f"lab.leaderboard: error: {e}") from None


if __name__ == "__main__":
    main()
