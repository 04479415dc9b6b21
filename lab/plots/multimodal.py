"""Lab 13: the image world, and what a blind and a multimodal LLaMA-Adapter answer about its test pictures.

    python -m lab.plots.multimodal world --out out/world
    python -m lab.plots.multimodal score --base out/lab06/ckpt --world out/world \\
        --runs out/lab13/blind out/lab13/multimodal --out handin/13/blind_vs_multimodal.png

``world`` writes the seeded image world (llama_min/finetune/images.py): train.json, four questions about
each of 600 pictures; test.json, 120 new pictures, half of them of colour-shape combinations that no
training picture has; and train_blind.json, the training records without their images, for a text-only
adapter. ``score`` loads each run's adapter (RUN/peft) onto the base, answers every test question greedily
(with its picture when the adapter has a visual projection), prints exact match per question type and
draws the runs side by side.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llama_min.checkpoint import tokenizer_file
from llama_min.finetune.exact_match import exact_match_by_question, image_answers
from llama_min.finetune.images import make_world, read_image_records
from llama_min.finetune.load import load_finetuned
from llama_min.tokenizer import load_tokenizer

from . import pyplot, save

COLUMNS = ("colour", "shape", "side", "count", "colour@held_out", "shape@held_out")


def write_world(out: Path, n_train: int, n_test: int) -> None:
    files = make_world(out, n_train, n_test)
    print(f"{len(json.loads(files['train'].read_text()))} training records in {files['train']}, the same without "
          f"their images in {files['train_blind']}; the test pictures' records in {files['test']}")


def score(base: Path, world: Path, runs: list[Path], out: Path) -> dict[str, dict[str, float]]:
    records = read_image_records(world / "test.json", world)
    tokenizer = load_tokenizer(tokenizer_file(base))
    results = {}
    for run in runs:
        model = load_finetuned(base, peft=run / "peft")
        scores = exact_match_by_question(image_answers(model, tokenizer, records, world, max_new_tokens=4), records)
        results[run.name] = scores
        print(f"{run.name:<14}" + "  ".join(f"{c} {scores[c]:.2f}" for c in COLUMNS))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(runs)
    for i, (name, scores) in enumerate(results.items()):
        ax.bar([c + i * width for c in range(len(COLUMNS))], [scores[c] for c in COLUMNS], width, label=name)
    ax.set_xticks([c + width * (len(runs) - 1) / 2 for c in range(len(COLUMNS))], COLUMNS, rotation=20)
    ax.set_ylabel("exact match on the test pictures")
    ax.set_ylim(0, 1)
    ax.legend()
    print(f"wrote {save(fig, out)}")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lab.plots.multimodal", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    world = sub.add_parser("world", help="write the image world and its blind training records")
    world.add_argument("--out", type=Path, required=True)
    world.add_argument("--n_train", type=int, default=600, help="training pictures (four records each)")
    world.add_argument("--n_test", type=int, default=120, help="test pictures, half of held-out combinations")
    scoring = sub.add_parser("score", help="exact match of adapter runs on the test pictures, and a bar chart")
    scoring.add_argument("--base", type=Path, required=True, help="the base checkpoint the runs were trained from")
    scoring.add_argument("--world", type=Path, required=True)
    scoring.add_argument("--runs", type=Path, nargs="+", required=True, help="train.py output directories")
    scoring.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    if args.command == "world":
        write_world(args.out, args.n_train, args.n_test)
    else:
        score(args.base, args.world, args.runs, args.out)


if __name__ == "__main__":
    main()
