"""The checkpoint directory format, and strict, atomic reading and writing of it.

    DIR/config.json          the ModelConfig fields
    DIR/model.safetensors    the weights, under Meta's parameter names (a tied output head is stored once)
    DIR/tokenizer.model      the tokenizer, when there is one (tokenizer.json for non-sentencepiece ones)

Loading is strict: every missing or unexpected tensor, and every shape that does not match the config,
is named in the error. Writing is atomic: files go to DIR.tmp, which then replaces DIR by renames, so a
crash or Ctrl-C at any moment leaves the previous checkpoint complete (in DIR, or in DIR.old during the
instant between the two renames, which the loader falls back to).
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .model import Llama

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def check_state_dict(expected: Mapping[str, torch.Size], got: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise one error naming every missing key, unexpected key and wrong shape."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = [f"{k}: expected {tuple(expected[k])}, found {tuple(got[k].shape)}"
             for k in sorted(set(expected) & set(got)) if tuple(got[k].shape) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong))
    if problems:
        raise ValueError(f"{source} does not match the model config: " + "; ".join(problems))


def stored_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores: the state dict, without the tied output head's second name."""
    state = model.state_dict()
    if model.config.tie_embeddings:
        del state["output.weight"]
    return state


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory; when the block ends without error it replaces ``path``."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def write_model_files(model: Llama, directory: Path, tokenizer_path: str | Path | None = None) -> None:
    """Write config, weights and tokenizer into an existing directory (not atomic on its own)."""
    model.config.save(directory / CONFIG_FILE)
    tensors = {k: v.detach().contiguous().cpu() for k, v in stored_state_dict(model).items()}
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, directory / Path(tokenizer_path).name)


def save_checkpoint(model: Llama, directory: str | Path, tokenizer_path: str | Path | None = None) -> None:
    with atomic_directory(directory) as tmp:
        write_model_files(model, tmp, tokenizer_path)


def resolve_checkpoint_dir(directory: str | Path) -> Path:
    """The directory to read: ``directory``, or its ``.old`` twin if a save was interrupted mid-swap."""
    directory = Path(directory)
    old = directory.with_name(directory.name + ".old")
    if not (directory / CONFIG_FILE).exists() and (old / CONFIG_FILE).exists():
        return old
    if not (directory / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{directory} is not a llama_min checkpoint: no {CONFIG_FILE} in it "
                                "(expected config.json + model.safetensors; convert other formats with weights_convert.py)")
    return directory


def tokenizer_file(directory: str | Path) -> Path | None:
    """The tokenizer file stored in a checkpoint directory, if any."""
    directory = resolve_checkpoint_dir(directory)
    return next((directory / n for n in TOKENIZER_FILES if (directory / n).exists()), None)


def load_checkpoint(directory: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> Llama:
    """Build the model described by DIR/config.json and load DIR/model.safetensors into it, strictly.

    The model is built on the meta device (no memory, no random init) and the loaded tensors are
    assigned to it, so loading a large model costs one copy of its weights.
    """
    directory = resolve_checkpoint_dir(directory)
    config = ModelConfig.load(directory / CONFIG_FILE)
    state = load_file(directory / WEIGHTS_FILE, device=str(device))
    with torch.device("meta"):
        model = Llama(config)
    check_state_dict({k: v.shape for k, v in stored_state_dict(model).items()}, state, str(directory / WEIGHTS_FILE))
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    if config.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:  # assign=True made two Parameters; make them one again
        model.output.weight = model.tok_embeddings.weight
    model.rope.to_empty(device=device)  # the rotary tables are derived, not stored: rebuild them
    model.rope.reset_tables()
    return model
