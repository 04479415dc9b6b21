"""Lab 11: your training loop, cross-entropy, AdamW and clipping against train.py, on the same small LLaMA.

    python -m lab.plots.scratch_loop --out handin/11/loss.png [--steps 40]

It runs ``python train.py`` for a few steps (logging every step), then trains the same model from the same
seed on the same batches with the same schedule and weight-decay groups through llama_min/from_scratch/ (your
code), and draws both loss curves. They must lie on top of each other: it prints the largest difference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from . import pyplot, save

REPO = Path(__file__).resolve().parents[2]
MODEL = ["--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--multiple_of", "32"]


def run_args(out_dir: Path, steps: int, data: Path | None = None, cache: Path | None = None) -> list[str]:
    """train.py's flags for the comparison: a small model, every step logged, no sampling."""
    where = ["--data", str(data), "--cache_dir", str(cache)] if data else []
    return [*MODEL, *where, "--out_dir", str(out_dir), "--seq_len", "64", "--batch_size", "8", "--max_steps",
            str(steps), "--warmup_steps", "5", "--lr", "3e-3", "--grad_clip", "0.5", "--log_every", "1",
            "--eval_every", str(steps), "--eval_tokens", "1024", "--sample_tokens", "0"]


def train_py_losses(args: list[str], out_dir: Path) -> list[float]:
    """The per-step training losses train.py logs for these flags."""
    run = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"train.py failed:\n{run.stderr[-2000:]}")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in records if r.get("train_loss") is not None]


def scratch_losses(args: list[str]) -> list[float]:
    """The same run through llama_min.from_scratch: the model, batches, schedule and groups train.py builds."""
    from llama_min.from_scratch.adamw import AdamW
    from llama_min.from_scratch.loop import train
    from llama_min.training.data import get_batch, make_sampler, prepare_data
    from llama_min.training.config import parse_args
    from llama_min.training.optim import get_lr, make_optimizer
    from llama_min.training.runtime import setup_runtime
    from llama_min.training.trainable import build_model

    cfg = parse_args(args)[0]
    if not cfg.data:  # train.py's defaults: the shipped corpus and its token cache
        from dataclasses import replace
        cfg = replace(cfg, data=str(REPO / "data" / "shakespeare"), cache_dir=str(REPO / "data" / "cache"))
    rt = setup_runtime(cfg.device, cfg.dtype)
    model, tokenizer_path = build_model(cfg, rt)
    data = prepare_data(cfg, rt, model.config.vocab_size, tokenizer_path)
    sampler = make_sampler(data, cfg)
    steps = [[get_batch(data, sampler, cfg, rt)[:2] for _ in range(cfg.grad_accum)]  # (x, y); no images here
             for _ in range(cfg.max_steps)]
    groups = make_optimizer(model, cfg, rt).param_groups  # decay on the matrices only, as train.py
    optimizer = AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups], lr=cfg.lr,
                      betas=(cfg.beta1, cfg.beta2))
    return train(model, steps, optimizer, lambda s: get_lr(s, cfg), cfg.grad_clip)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lab.plots.scratch_loop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("handin/11/loss.png"))
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="scratch_loop_") as tmp:
        flags = run_args(Path(tmp), args.steps)
        reference = train_py_losses(flags, Path(tmp))
        mine = scratch_losses(flags)
    worst = max(abs(a - b) for a, b in zip(mine, reference))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(reference) + 1), reference, lw=3, alpha=0.5, label="train.py (torch's pieces)")
    ax.plot(range(1, len(mine) + 1), mine, lw=1, label="llama_min/from_scratch (yours)")
    ax.set(xlabel="step", ylabel="training loss (nats per token)",
           title=f"the same run twice: largest difference {worst:.2g}")
    ax.legend()
    save(fig, args.out)
    print(f"{len(mine)} steps; losses {reference[0]:.4f} -> {reference[-1]:.4f}; largest difference between the "
          f"two runs {worst:.3g} (under 1e-4 is a match); plot: {args.out}")


if __name__ == "__main__":
    main()
