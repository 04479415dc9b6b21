"""Write the benchmark to disk: the pretraining mix, the instruction records and a tokenizer for both.

    python -m experiments.make_benchmark --out runs/benchmark [--words 240 --heldout 60 --seed 0]

    OUT/pretrain/train.jsonl        every fact of every word as sentences, grouped into shuffled documents
    OUT/pretrain/val.jsonl          the same facts regrouped: pretraining memorises facts, so its
                                    validation loss measures how much of them is remembered
    OUT/instructions/train.jsonl    Alpaca records of the fine-tuning words (one per word and task)
    OUT/instructions/eval.jsonl     Alpaca records of the held-out words, for exact-match evaluation
    OUT/tokenizer.model             sentencepiece, trained on the sentences and the rendered prompts
    OUT/benchmark.json                    the settings and the word lists

The tokenizer sees the Alpaca prompts too, so a whole prompt (236 characters) is about 57 tokens; the
words themselves stay close to one token per letter, which the spelling tasks need.
Every file is a deterministic function of the flags.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from llama_min.checkpoint import replace_directory
from llama_min.tokenizer import Tokenizer

from .tasks import TASKS, make_words, records, sentences, split_words


def documents(facts: list[str], per_doc: int, rng: random.Random) -> list[str]:
    """Shuffle the sentences and join them, per_doc at a time, into documents (one per line of text)."""
    facts = facts[:]
    rng.shuffle(facts)
    return ["\n".join(facts[i:i + per_doc]) for i in range(0, len(facts), per_doc)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def make_benchmark(out: str | Path, n_words: int = 240, n_heldout: int = 60, seed: int = 0,
             tasks: list[str] | None = None, per_doc: int = 8, vocab_size: int = 512) -> dict:
    """Write the benchmark into OUT (replaced atomically) and return its description (benchmark.json)."""
    tasks = list(tasks or TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; choose from {', '.join(TASKS)}")
    words = make_words(n_words, seed)
    tune_words, heldout_words = split_words(words, n_heldout)
    rng = random.Random(seed + 1)
    facts = sentences(words, tasks)  # all words: the base must know the held-out facts too
    train_docs, val_docs = documents(facts, per_doc, rng), documents(facts, per_doc, rng)
    tune, heldout = records(tune_words, tasks), records(heldout_words, tasks)
    description = {"seed": seed, "tasks": tasks, "n_words": n_words, "n_heldout": n_heldout,
                   "per_doc": per_doc, "vocab_size": vocab_size,
                   "tune_words": tune_words, "heldout_words": heldout_words}
    with replace_directory(out, ours=frozenset({"pretrain", "instructions", "tokenizer.model", "benchmark.json"})) as tmp:
        write_jsonl(tmp / "pretrain" / "train.jsonl", [{"text": d} for d in train_docs])
        write_jsonl(tmp / "pretrain" / "val.jsonl", [{"text": d} for d in val_docs])
        for name, rows in (("train", tune), ("eval", heldout)):
            write_jsonl(tmp / "instructions" / f"{name}.jsonl",
                        [{"instruction": r.instruction, "input": r.input, "output": r.output} for _, r in rows])
        corpus = tmp / "tokenizer_corpus.txt"
        corpus.write_text("\n".join(train_docs + [r.prompt() + r.output for _, r in tune]), encoding="utf-8")
        # LLaMA's own recipe (lines, a space before each): it leaves a word that starts a line, as every
        # answer does, in short pieces, which suits letter tasks. Paragraph training (the default) gave
        # seed 0 full fine-tuning 0.258 exact match instead of 0.353 and LoRA 0.078 instead of 0.292.
        Tokenizer.train([corpus], tmp / "tokenizer.model", vocab_size=vocab_size, by_line=True)
        corpus.unlink()
        (tmp / "benchmark.json").write_text(json.dumps(description, indent=2) + "\n")
    return description


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write (replaced if it exists)")
    parser.add_argument("--words", type=int, default=240, help="number of pseudo-words")
    parser.add_argument("--heldout", type=int, default=60, help="words held out of fine-tuning, for evaluation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the words and the document order")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), help="tasks to include")
    parser.add_argument("--vocab_size", type=int, default=512, help="pieces of the benchmark tokenizer")
    args = parser.parse_args(argv)
    d = make_benchmark(args.out, args.words, args.heldout, args.seed, args.tasks, vocab_size=args.vocab_size)
    print(f"wrote {args.out}: {len(d['tune_words'])} fine-tuning words, {len(d['heldout_words'])} held-out words, "
          f"tasks {', '.join(d['tasks'])}")


if __name__ == "__main__":
    main()
