"""The multimodal LLaMA-Adapter against a blind one, on the image world: the table and gate plot of docs/multimodal.md.

    python -m experiments.multimodal --base runs/base/ckpt --out runs/multimodal --seeds 0 1 2
    python -m experiments.multimodal --base B --out /tmp/quick --seeds 0 --steps 20 --n_train 40 --n_test 8

BASE is any checkpoint of train.py with its tokenizer, e.g. the default ``python train.py`` on the shipped
Shakespeare, whose vocabulary has every answer word. For each seed, two LLaMA-Adapters are trained by
``python train.py`` (a child process each) on the same image-world records for the same steps:

    multimodal   --image_root WORLD: the lab encoder's features projected into every adapted layer's prompts
    blind        the same records without their "image" field: a text-only adapter, which can learn no more
                 than the most frequent answer to each question

and both are scored by exact match on the test pictures (never seen in training; half of them of colour-shape
combinations no training picture has), per question type, and for colour and shape also on the held-out
combinations alone. Writes OUT/results.json, OUT/table.md and OUT/gates.png (the adapter's mean gate per layer
over the multimodal run of the first seed, from its metrics.jsonl).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from llama_min.checkpoint import tokenizer_file
from llama_min.finetune.exact_match import exact_match_by_question, image_answers, image_features
from llama_min.finetune.images import COLOURS, QUESTIONS, make_world, question_type, read_image_records
from llama_min.finetune.instructions import encode_record
from llama_min.finetune.load import load_finetuned
from llama_min.model import IGNORE_INDEX
from llama_min.tokenizer import load_tokenizer

from .run_benchmark import run_child

KINDS = ("multimodal", "blind")


def finetune(base: Path, world: Path, records: Path, run_dir: Path, seed: int, args, images: bool) -> dict:
    flags = (["--image_root", str(world)] if images else []) + (["--train_norms"] if args.train_norms else [])
    return run_child(["--init_from", str(base), "--method", "adapter", "--data", str(records), *flags,
                      "--seq_len", str(args.seq_len), "--batch_size", str(args.batch_size), "--lr", str(args.lr),
                      "--weight_decay", str(args.weight_decay), "--warmup_steps", str(args.warmup_steps),
                      "--max_steps", str(args.steps), "--eval_every", str(args.steps),
                      "--log_every", "10", "--sample_tokens", "0", "--seed", str(seed), "--out_dir", str(run_dir)],
                     run_dir / "train.log")


def finished(run_dir: Path, steps: int) -> bool:
    """Whether run_dir holds a run that reached ``steps`` (its metrics.jsonl says so)."""
    metrics = run_dir / "metrics.jsonl"
    if not (run_dir / "peft" / "peft.json").is_file() or not metrics.is_file():
        return False
    return any(json.loads(line).get("step") == steps for line in metrics.read_text().splitlines() if line.strip())


def score(base: Path, run_dir: Path, world: Path) -> tuple[dict[str, float], list[str]]:
    """Exact match per question type on the test pictures, colour and shape also on the held-out
    combinations alone (keys colour@held_out, shape@held_out); and the answers, one per test record. The
    multimodal adapter sees each picture through the encoder it was trained with; the blind one has none."""
    model = load_finetuned(base, peft=run_dir / "peft")
    records = read_image_records(world / "test.json", world)
    got = image_answers(model, load_tokenizer(tokenizer_file(base)), records, world, max_new_tokens=4)
    return exact_match_by_question(got, records), got


@torch.no_grad()
def answer_losses(base: Path, run_dir: Path, world: Path) -> dict[str, dict[str, float]]:
    """Per question type, the mean loss (nats) on the test records of the answer's first token, of its other
    tokens, and of the EOS that must end it: where an adapter that misses exact matches goes wrong."""
    model = load_finetuned(base, peft=run_dir / "peft").eval()
    tokenizer = load_tokenizer(tokenizer_file(base))
    records = read_image_records(world / "test.json", world)
    features = image_features(model, records, world)
    parts: dict[str, dict[str, list[float]]] = {}
    for r in records:
        tokens, targets = encode_record(r, tokenizer)
        answer = torch.tensor(targets) != IGNORE_INDEX  # the answer's tokens and EOS
        logits = model(torch.tensor([tokens]), images=None if features is None else features[r.image][None])[0][0]
        nll = F.cross_entropy(logits[answer].float(), torch.tensor(targets)[answer], reduction="none").tolist()
        kind = parts.setdefault(question_type(r), {"first": [], "rest": [], "eos": []})
        kind["first"].append(nll[0])
        kind["rest"] += nll[1:-1]
        kind["eos"].append(nll[-1])
    return {q: {part: statistics.mean(v) for part, v in p.items() if v} for q, p in parts.items()}


def gate_plot(run_dir: Path, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("peft")]
    steps = [r["step"] for r in rows]
    gates = [r["peft"]["adapter_gate"] for r in rows]  # (logged steps, layers)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for layer in range(len(gates[0])):
        ax.plot(steps, [g[layer] for g in gates], label=f"layer {layer}")
    ax.set_xlabel("step")
    ax.set_ylabel("gate (mean over heads)")
    ax.set_title("multimodal LLaMA-Adapter: gates per layer while training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def mean_loss(values: list[float | None]) -> str:
    """The mean, or "-" where a seed had no such token (a test set whose answers are all one token long)."""
    return "-" if None in values else f"{statistics.mean(values):.2f}"


def table(per_seed: dict[int, dict]) -> str:
    seeds = sorted(per_seed)
    columns = [*QUESTIONS, "colour@held_out", "shape@held_out"]
    lines = [f"| adapter | {' | '.join(columns)} |", "|---|" + "---:|" * len(columns)]
    for kind in KINDS:
        cells = []
        for c in columns:
            values = [per_seed[s][kind]["scores"][c] for s in seeds]
            cells.append(f"{statistics.mean(values):.3f} ({', '.join(f'{v:.2f}' for v in values)})")
        lines.append(f"| {kind} | {' | '.join(cells)} |")
    lines += ["", "Answer loss on the test records, nats, mean over the seeds: first token / other tokens / EOS", "",
              f"| adapter | {' | '.join(QUESTIONS)} |", "|---|" + "---:|" * len(QUESTIONS)]
    for kind in KINDS:
        cells = [" / ".join(mean_loss([per_seed[s][kind]["answer_loss"][q].get(part) for s in seeds])
                            for part in ("first", "rest", "eos")) for q in QUESTIONS]
        lines.append(f"| {kind} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="base checkpoint directory (with its tokenizer)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-2)
    parser.add_argument("--weight_decay", type=float, default=0.0,
                        help="AdamW decay of the prompts and the projection (at lr 5e-2, 0.1 shrinks them 0.5%% a step)")
    parser.add_argument("--warmup_steps", type=int, default=20)
    parser.add_argument("--train_norms", action=argparse.BooleanOptionalAction, default=True,
                        help="also train the RMSNorm gains (as LLaMA-Adapter V2 does): a base pretrained on one "
                             "document has met EOS once, and the adapter alone barely learns to stop")
    parser.add_argument("--n_train", type=int, default=600, help="training pictures (four records each)")
    parser.add_argument("--n_test", type=int, default=120, help="test pictures")
    parser.add_argument("--seq_len", type=int, default=128, help="train.py's --seq_len (a record's tokens)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # scoring here, like each train.py child: one thread (see run_benchmark.py on why)
    out, base = Path(args.out), Path(args.base)
    world = out / "world"
    records = make_world(world, args.n_train, args.n_test, seed=0)  # train, test and train_blind (no images)
    per_seed = {}
    for seed in args.seeds:
        per_seed[seed] = {}
        for kind in KINDS:
            run_dir = out / f"seed{seed}" / kind
            images = kind == "multimodal"
            if finished(run_dir, args.steps):  # trained by an earlier call of this command: score it again
                cost = {"wall_s": None, "peak_mb": None}
            else:
                cost = finetune(base, world, records["train" if images else "train_blind"], run_dir, seed, args,
                                images)
            scores, got = score(base, run_dir, world)
            per_seed[seed][kind] = {"scores": scores, "answer_loss": answer_losses(base, run_dir, world), **cost,
                                    "answers": got}
            print(f"seed {seed}: {kind:<10} " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()), flush=True)
    gate_plot(out / f"seed{args.seeds[0]}" / "multimodal", out / "gates.png")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "colours": list(COLOURS),
                                                  "per_seed": per_seed}, indent=2) + "\n")
    text = table(per_seed)
    (out / "table.md").write_text(text + "\n")
    print(text)
    return per_seed


if __name__ == "__main__":
    main()
