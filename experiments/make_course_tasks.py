"""Write the word-task set that labs 7 and 8 fine-tune on: data/word_tasks/tasks.jsonl.

    python -m experiments.make_course_tasks                 # rewrites data/word_tasks/tasks.jsonl
    python -m experiments.make_course_tasks --out DIR       # somewhere else (a test compares the two)

One Alpaca record per word and task (experiments/tasks.py: reverse, capitals, first and last letter,
length, sorted letters), for 240 seeded pseudo-words. The fine-tuning words come first and the 60
held-out words last, so that `train.py --val_fraction 0.25` holds out exactly the held-out words' records:
the held-out answer loss and exact match then measure the instruction format reaching words the
fine-tuning never showed. The file is a deterministic function of the flags.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .tasks import TASKS, make_words, records, split_words

REPO = Path(__file__).resolve().parents[1]
FILE = "tasks.jsonl"


def write_course_tasks(out: str | Path, n_words: int = 240, n_heldout: int = 60, seed: int = 0) -> Path:
    """Write OUT/tasks.jsonl (fine-tuning words' records, then the held-out words'); returns its path."""
    tune_words, heldout_words = split_words(make_words(n_words, seed), n_heldout)
    rows = [{"instruction": r.instruction, "input": r.input, "output": r.output}
            for _, r in records(tune_words, list(TASKS)) + records(heldout_words, list(TASKS))]
    path = Path(out) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{FILE}.partial")
    partial.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    partial.replace(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "data" / "word_tasks"), help="directory of tasks.jsonl")
    args = parser.parse_args(argv)
    path = write_course_tasks(args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
