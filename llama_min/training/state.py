"""Checkpoints of a training run and resuming from them.

    OUT_DIR/ckpt/   a full checkpoint (full, partial): config.json, model.safetensors, tokenizer, train_state.pt
    OUT_DIR/peft/   a PEFT run: only the adapter (peft.safetensors, peft.json) and train_state.pt
    OUT_DIR/best/   --dev_every: the model with the best dev score, for use (no training state)
    OUT_DIR/merged/ --merge: the LoRA folded into the weights, a plain full checkpoint

train_state.pt holds what ``--resume`` needs besides the weights: the step, the optimiser, the data
sampler, every random generator, the early-stopping progress and the run's own settings. It is read with
``torch.load(weights_only=True)``: plain containers and tensors only, no code.
"""

from __future__ import annotations

import random
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import atomic_directory, resolve_checkpoint_dir, write_model_files
from ..cli import UsageError
from ..finetune.templates import record_template
from ..model import Llama
from ..peft import fold_lora, save_peft
from ..tokenizer import Tokenizer
from .config import TrainConfig
from .data import WindowSampler

STATE_FILE = "train_state.pt"  # next to the model's files in the checkpoint directory


def checkpoint_dir(cfg: TrainConfig) -> Path:
    """OUT_DIR/ckpt (a full checkpoint: full, partial) or, for a PEFT method, OUT_DIR/peft (the adapter only)."""
    return Path(cfg.out_dir) / ("ckpt" if cfg.full_checkpoint else "peft")


def rng_states() -> dict:
    """Every random generator the loop touches, in types torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    states = {"torch": torch.get_rng_state(), "numpy": np_state, "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np_state = dict(states["numpy"])
    np_state["state"] = {**np_state["state"], "key": np.array(np_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(np_state)
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def write_model(directory: Path, model: Llama, tokenizer: Tokenizer, cfg: TrainConfig, instructions: bool) -> None:
    """The model part of a checkpoint, into an existing directory: the core format (full, partial) or,
    for a PEFT method, the adapter-only peft.safetensors + peft.json naming the base --init_from.
    A model tuned on instruction data records the Alpaca template, which generate.py then uses."""
    if cfg.full_checkpoint:
        write_model_files(model, directory, tokenizer.path)
    else:
        save_peft(model, directory, base_checkpoint=cfg.init_from)  # (atomic on its own, inside ours)
    if instructions:
        record_template(directory, "alpaca")


def save_checkpoint(directory: Path, model: Llama, tokenizer: Tokenizer, optimizer, sampler: WindowSampler,
                    step: int, best_val_loss: float, cfg: TrainConfig, instructions: bool = False,
                    early_stopping: dict | None = None) -> None:
    """The model (``write_model``) plus train_state.pt, written to DIR.tmp and swapped in by renames,
    so an interruption at any instant leaves the previous checkpoint or the new one, never a mix."""
    with atomic_directory(directory) as tmp:
        write_model(tmp, model, tokenizer, cfg, instructions)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "sampler": sampler.state_dict(),
                    "rng": rng_states(), "best_val_loss": best_val_loss, "train_config": asdict(cfg),
                    "early_stopping": early_stopping}, tmp / STATE_FILE)


def save_model_only(directory: Path, model: Llama, tokenizer: Tokenizer, cfg: TrainConfig, instructions: bool) -> None:
    """The model alone, in the run's format, replacing DIR atomically: --dev_every's best model (for use,
    not for --resume)."""
    with atomic_directory(directory) as tmp:
        write_model(tmp, model, tokenizer, cfg, instructions)


def write_merged(directory: Path, model: Llama, tokenizer: Tokenizer, instructions: bool) -> None:
    """--merge: fold (alpha/r)·B·A into W (the adapter is gone from ``model`` afterwards) and write a
    full checkpoint, atomically; it loads as a plain model, with no --peft."""
    fold_lora(model)
    with atomic_directory(directory) as tmp:
        write_model_files(model, tmp, tokenizer.path)
        if instructions:
            record_template(tmp, "alpaca")


def load_train_state(directory: Path) -> dict:
    try:
        path = resolve_checkpoint_dir(directory) / STATE_FILE
    except FileNotFoundError:  # an adapter directory holds no config.json
        path = directory / STATE_FILE
    if not path.exists():
        raise UsageError(f"--resume: {path} does not exist; train without --resume first")
    return torch.load(path, weights_only=True)


def resumed_config(cfg: TrainConfig, given: set[str]) -> TrainConfig:
    """For --resume: the saved run's settings, except the flags given again on this command line."""
    saved = load_train_state(checkpoint_dir(cfg))["train_config"]
    changed = sorted(k for k, v in cfg.model_overrides.items() if saved["model_overrides"].get(k) != v)
    changed += sorted(k for k, v in cfg.peft_overrides.items() if saved["peft_overrides"].get(k) != v)
    changed += [k for k in ("train_layers", "train_norms", "train_output")  # the optimiser state is theirs
                if k in given and saved.get(k, getattr(TrainConfig, k)) != getattr(cfg, k)]
    if changed or saved["method"] != cfg.method:
        raise UsageError("--resume continues the saved model and its method; model, --method, PEFT and --train_* "
                         f"flags cannot change it (drop {' '.join('--' + k for k in changed or ['method'])})")
    return replace(TrainConfig(**saved), **{k: getattr(cfg, k) for k in given})
