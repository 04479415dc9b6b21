"""What fine-tuning on the word tasks changed (labs 7 and 8): the base model and the fine-tuned one scored
side by side on the held-out words of data/word_tasks/tasks.jsonl.

    python -m lab.plots.word_tasks --checkpoint out/lab06/ckpt --peft out/lab07/peft --out word_tasks.png

The held-out records are the file's last quarter, as `train.py --val_fraction 0.25` holds them out: words
no fine-tuning step saw. For each task (its instruction) and in total: the answer loss (mean cross-entropy
per answer token, EOS included, the prompt not counted: what train.py reports as the held-out loss) and the
exact match of the greedy answer (llama_min/finetune/exact_match.py). The base is the checkpoint alone; the
adapter starts as exactly the base, so that column is the fine-tuning's starting point.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from llama_min.checkpoint import tokenizer_file
from llama_min.finetune.exact_match import answers
from llama_min.finetune.instructions import encode_record, read_records
from llama_min.finetune.load import load_finetuned
from llama_min.model import IGNORE_INDEX
from llama_min.tokenizer import load_tokenizer

from . import pyplot, save

TASKS = Path(__file__).resolve().parents[2] / "data" / "word_tasks" / "tasks.jsonl"


def held_out(path: Path, val_fraction: float) -> list:
    """The records train.py holds out with this --val_fraction: the file's last ones."""
    records = read_records(path)
    return records[len(records) - max(1, round(len(records) * val_fraction)):]


@torch.no_grad()
def score(model, tokenizer, records) -> dict[str, tuple[float, float]]:
    """{instruction (and "all"): (answer loss in nats per answer token, exact-match accuracy)}."""
    got = answers(model, tokenizer, records)
    # instruction -> [summed token loss, answer tokens, exact, records]; "all" last
    sums: dict[str, list[float]] = {r.instruction: [0.0, 0, 0, 0] for r in records} | {"all": [0.0, 0, 0, 0]}
    for record, answer in zip(records, got):
        tokens, targets = (torch.tensor([ids]) for ids in encode_record(record, tokenizer))
        counted = int((targets != IGNORE_INDEX).sum())
        loss = model(tokens, targets)[1].item() * counted
        for s in (sums[record.instruction], sums["all"]):
            s[0], s[1], s[2], s[3] = s[0] + loss, s[1] + counted, s[2] + (answer.strip() == record.output.strip()), s[3] + 1
    return {key: (s[0] / s[1], s[2] / s[3]) for key, s in sums.items()}


def short(instruction: str) -> str:
    """A bar label: "Give the first letter of the word." -> "first letter"."""
    return instruction.rstrip(".").replace(" of the word", "").replace(" the word", "").removeprefix("Give the ")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="the base checkpoint (out/lab06/ckpt)")
    parser.add_argument("--peft", required=True, help="the fine-tuned adapter (OUT_DIR/peft of the train.py run)")
    parser.add_argument("--tasks", type=Path, default=TASKS, help="the task file the run fine-tuned on")
    parser.add_argument("--val_fraction", type=float, default=0.25, help="the run's --val_fraction")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    # One thread: at this model size a second one gains nothing, and on a machine shared with other jobs
    # two threads ran this script many times slower than one.
    torch.set_num_threads(1)
    records = held_out(args.tasks, args.val_fraction)
    tokenizer = load_tokenizer(tokenizer_file(args.checkpoint))
    before = score(load_finetuned(args.checkpoint), tokenizer, records)
    after = score(load_finetuned(args.checkpoint, peft=args.peft), tokenizer, records)
    print(f"{len(records)} held-out records; answer loss (nats/token) and exact match, base -> fine-tuned")
    for key in before:
        (l0, e0), (l1, e1) = before[key], after[key]
        print(f"  {key:<46} loss {l0:6.3f} -> {l1:6.3f}   exact match {e0:.3f} -> {e1:.3f}")
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    keys = list(before)
    x = torch.arange(len(keys)).numpy()
    for ax, i, label in ((axes[0], 0, "answer loss (nats per token)"), (axes[1], 1, "exact match")):
        ax.bar(x - 0.2, [before[k][i] for k in keys], 0.4, label="base")
        ax.bar(x + 0.2, [after[k][i] for k in keys], 0.4, label=f"fine-tuned ({Path(args.peft).parent.name})")
        ax.set_xticks(x, [short(k) for k in keys], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"held-out words of {args.tasks.name}: base vs fine-tuned")
    print(f"wrote {save(fig, args.out)}")


if __name__ == "__main__":
    main()
