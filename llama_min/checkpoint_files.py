"""The checkpoint directory on disk: strict, atomic reading and writing of its files.

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
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig

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


def stored_state_dict(model) -> dict[str, torch.Tensor]:
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


def write_model_files(model, directory: Path, tokenizer_path: str | Path | None = None) -> None:
    """Write config, weights and tokenizer into an existing directory (not atomic on its own)."""
    model.config.save(directory / CONFIG_FILE)
    tensors = {k: v.detach().contiguous().cpu() for k, v in stored_state_dict(model).items()}
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, directory / Path(tokenizer_path).name)


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


def read_checkpoint(directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                    names: list[str] | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """DIR's config and its tensors (all, or those ``names``), on ``device``, floating tensors in
    ``dtype`` (None: as stored).

    Tensor by tensor: each is read from the file on the CPU, checked, converted, and moved, so the peak
    is the converted model plus one tensor, never a whole second copy in the stored dtype. A damaged
    file, a config that is not ours, or a weight that is NaN or infinite is one error naming the file
    (and the tensor).
    """
    directory = resolve_checkpoint_dir(directory)
    config = read_config(directory / CONFIG_FILE)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing; a checkpoint holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    tensors = {}
    try:
        with safe_open(weights, framework="pt", device="cpu") as f:
            for name in f.keys() if names is None else names:
                t = f.get_tensor(name)
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise ValueError(f"{weights}: tensor {name} holds NaN or infinite values; this checkpoint "
                                     "cannot be used (saved from a diverged run?): take an earlier one")
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                tensors[name] = t.to(device)
    except ValueError:
        raise
    except Exception as e:  # safetensors' own errors: a short file, a broken header
        raise ValueError(f"{weights} cannot be read ({' '.join(str(e).split())[:120]}); the file is damaged "
                         "(truncated, or not safetensors): copy or convert it again") from None
    return config, tensors


def read_config(path: Path) -> ModelConfig:
    """A checkpoint's config.json, or one error naming the file and what is wrong with it."""
    try:
        return ModelConfig.load(path)
    except (ValueError, TypeError) as e:  # not JSON, unknown fields, an impossible shape
        raise ValueError(f"{path}: not a llama_min model config ({' '.join(str(e).split())[:160]})") from None


def load_model(cls, directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """Build ``cls(config)`` (a Llama) from DIR, loading its tensors strictly (``Llama.from_checkpoint``).

    The model is built on the meta device (no memory, no random init) and the loaded tensors are
    assigned to it, so loading costs one copy of the weights.
    """
    config, state = read_checkpoint(directory, device, dtype)
    with torch.device("meta"):
        model = cls(config)
    check_state_dict({k: v.shape for k, v in stored_state_dict(model).items()}, state,
                     str(resolve_checkpoint_dir(directory) / WEIGHTS_FILE))
    if config.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:  # assign=True made two Parameters; make them one again
        model.output.weight = model.tok_embeddings.weight
    return model


def save_model(model, directory: str | Path, tokenizer_path: str | Path | None = None) -> None:
    """Write the model's config, weights and tokenizer to DIR, replacing it atomically."""
    with atomic_directory(directory) as tmp:
        write_model_files(model, tmp, tokenizer_path)
