"""Loss curves of several train.py runs on one figure (lab/experiments.md: the learning-rate sweep, the
ablations), read from each run's metrics.jsonl.

    python -m lab.plots.curves --runs out/exp/lr1e-3 out/exp/lr3e-3 out/exp/lr1e-2 --out lr_sweep.png

Left: the training loss logged every --log_every steps; right: the held-out loss, in bits per byte (the
figure that does not depend on the tokenizer), at every evaluation. One colour per run, labelled with its
directory's name (or --labels).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import pyplot, save


def read_metrics(run: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, training loss) and (step, held-out bits per byte) of the run in directory ``run``."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"lab.plots.curves: error: {path} does not exist; pass the --out_dir of a train.py run")
    train, held_out = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("train_loss") is not None:
            train.append((record["step"], record["train_loss"]))
        if record.get("val_bpb") is not None:
            held_out.append((record["step"], record["val_bpb"]))
    return train, held_out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="train.py output directories")
    parser.add_argument("--labels", nargs="+", help="one label per run (default: the directory names)")
    parser.add_argument("--title", default="", help="the figure's title")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    labels = args.labels or [run.name for run in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit(f"lab.plots.curves: error: {len(labels)} labels for {len(args.runs)} runs; give one per run")
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for run, label in zip(args.runs, labels):
        train, held_out = read_metrics(run)
        if train:
            left.plot(*zip(*train), label=label)
        if held_out:
            right.plot(*zip(*held_out), marker="o", label=label)
            print(f"{label}: held-out {held_out[-1][1]:.4f} bits per byte at step {held_out[-1][0]}")
    left.set(xlabel="step", ylabel="training loss (nats per token)", title="training loss")
    right.set(xlabel="step", ylabel="bits per byte", title="held-out bits per byte")
    for ax in (left, right):
        ax.legend()
    if args.title:
        fig.suptitle(args.title)
    print(f"wrote {save(fig, args.out)}")


if __name__ == "__main__":
    main()
