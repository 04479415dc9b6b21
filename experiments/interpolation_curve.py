"""Accuracy, robustness and forgetting along the line from the base to the fine-tuned model,
θ(a) = (1 − a)·θ₀ + a·θ (WiSE-FT, Wortsman et al. 2022; ``llama_min.finetune.interpolate``).

    python -m experiments.interpolation_curve --checkpoint BASE --peft ADAPTER --records runs/benchmark/instructions/eval.jsonl \
        --corpus runs/benchmark/pretrain --out runs/curve
    python -m experiments.interpolation_curve --checkpoint TUNED --base BASE --records ... --out runs/curve

For every a (default 0, 0.25, 0.5, 0.75, 1) the model is loaded afresh and moved to θ(a) (the move is
in place and not exactly undoable), then scored with ``experiments.evaluate``: exact-match accuracy by greedy
generation on the records and on their perturbed copy (``llama_min.finetune.perturb.perturb_for_eval``, seeded
by --perturb_seed), the mean cross-entropy of the answers given their prompts, and with --corpus the
held-out bits per byte of the pretraining corpus (forgetting). Writes OUT/curve.json (the figures) and
OUT/curve.png (accuracies and, on the right axis, corpus bits per byte or else the answer loss, against
a; needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from llama_min.checkpoint import tokenizer_file
from llama_min.finetune.instructions import read_records
from llama_min.finetune.load import check_interpolation_flags, load_finetuned
from llama_min.finetune.perturb import perturb_for_eval
from llama_min.tokenizer import load_tokenizer

from .evaluate import answer_loss, corpus_bpb, exact_match

COEFFICIENTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def curve(checkpoint: str, records, tokenizer: Tokenizer, peft: str = "", base: str = "",
          coefficients=COEFFICIENTS, max_new_tokens: int = 16, batch_size: int = 64, device: str = "cpu",
          perturb_seed: int = 0, corpus: str = "", cache_dir: str = "", corpus_seq_len: int = 64) -> list[dict]:
    """[{"a", "accuracy", "per_task", "perturbed_accuracy", "answer_loss"[, "corpus_bpb"]}] for each
    coefficient, in the given order; corpus bits per byte when a corpus directory is given."""
    for a in coefficients:  # every flag problem before the first (slow) evaluation
        check_interpolation_flags(a, peft, base)
    perturbed = perturb_for_eval(records, perturb_seed)
    points = []
    for a in coefficients:
        model = load_finetuned(checkpoint, peft, base, a, device)
        scores = exact_match(model, tokenizer, records, max_new_tokens, batch_size)
        point = {"a": a, "accuracy": scores["accuracy"], "per_task": scores["per_task"],
                 "perturbed_accuracy": exact_match(model, tokenizer, perturbed, max_new_tokens, batch_size)["accuracy"],
                 "answer_loss": answer_loss(model, tokenizer, records, batch_size)}
        if corpus:
            point["corpus_bpb"] = corpus_bpb(model, tokenizer, corpus, cache_dir, corpus_seq_len)
        points.append(point)
    return points


def plot(points: list[dict], path: Path, title: str) -> None:
    """Clean and perturbed accuracy (left axis) and corpus bits per byte, or else the answer loss
    (right axis), against a, as a PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(f"matplotlib is needed to draw {path} (pip install matplotlib); "
                         f"the figures are in {path.with_suffix('.json')}") from None
    a = [p["a"] for p in points]
    fig, left = plt.subplots(figsize=(6, 4))
    left.plot(a, [p["accuracy"] for p in points], marker="o", color="tab:blue", label="exact match, clean")
    left.plot(a, [p["perturbed_accuracy"] for p in points], marker="o", linestyle="--", color="tab:cyan",
              label="exact match, perturbed")
    left.set_xlabel("a  (0: base, 1: fine-tuned)")
    left.set_ylabel("exact-match accuracy", color="tab:blue")
    left.set_ylim(0, 1)
    left.legend(loc="upper left")
    key, label = (("corpus_bpb", "pretraining corpus, bits per byte") if "corpus_bpb" in points[0]
                  else ("answer_loss", "held-out answer loss (nats/token)"))
    right = left.twinx()
    right.plot(a, [p[key] for p in points], marker="s", color="tab:red")
    right.set_ylabel(label, color="tab:red")
    left.set_title(title)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)  # atomic: a reader never sees half a PNG


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the base (with --peft) or the fine-tuned checkpoint (with --base)")
    parser.add_argument("--peft", default="", help="an adapter directory whose contribution a scales")
    parser.add_argument("--base", default="", help="the base checkpoint of a fully or partially fine-tuned --checkpoint")
    parser.add_argument("--records", required=True, help="held-out Alpaca records (.json or .jsonl) to score")
    parser.add_argument("--out", required=True, help="directory for curve.json and curve.png")
    parser.add_argument("--coefficients", type=float, nargs="+", default=list(COEFFICIENTS), metavar="A",
                        help="values of a in [0, 1] (default: 0 0.25 0.5 0.75 1)")
    parser.add_argument("--perturb_seed", type=int, default=0, help="seed of the perturbed copy of the records")
    parser.add_argument("--corpus", default="", help="a pretraining corpus directory (train/val files): also measure "
                        "its held-out bits per byte (forgetting)")
    parser.add_argument("--cache_dir", default="", help="where --corpus's tokens are cached (default: OUT/cache)")
    parser.add_argument("--corpus_seq_len", type=int, default=64, help="window length for --corpus bits per byte")
    parser.add_argument("--limit", type=int, default=0, help="score only the first N records (0: all)")
    parser.add_argument("--max_new_tokens", type=int, default=16, help="longest answer generated")
    parser.add_argument("--batch_size", type=int, default=64, help="prompts scored together")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        tok_path = tokenizer_file(args.checkpoint)
    except FileNotFoundError as e:
        parser.error(str(e))
    if tok_path is None:
        parser.error(f"{args.checkpoint} holds no tokenizer (tokenizer.model): copy the one it was trained with there")
    records = read_records(args.records)
    records = records[:args.limit] if args.limit else records
    try:
        points = curve(args.checkpoint, records, load_tokenizer(tok_path), args.peft, args.base, args.coefficients,
                       args.max_new_tokens, args.batch_size, args.device, args.perturb_seed, args.corpus,
                       args.cache_dir or str(Path(args.out) / "cache"), args.corpus_seq_len)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"checkpoint": args.checkpoint, "peft": args.peft, "base": args.base, "records": args.records,
               "n": len(records), "perturb_seed": args.perturb_seed, "corpus": args.corpus, "points": points}
    tmp = out / "curve.json.tmp"
    tmp.write_text(json.dumps(figures, indent=2) + "\n")
    os.replace(tmp, out / "curve.json")
    plot(points, out / "curve.png", f"{'/'.join(Path(args.peft or args.checkpoint).parts[-2:])}: base (a=0) to fine-tuned (a=1)")
    for p in points:
        corpus = f"   corpus {p['corpus_bpb']:.4f} bits/byte" if "corpus_bpb" in p else ""
        print(f"a = {p['a']:.2f}   exact match {p['accuracy']:.3f} clean, {p['perturbed_accuracy']:.3f} perturbed   "
              f"answer loss {p['answer_loss']:.4f}{corpus}")
    return points


if __name__ == "__main__":
    main()
