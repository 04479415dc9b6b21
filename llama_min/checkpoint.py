"""A model directory: ``load_checkpoint(DIR)`` reads one, ``save_checkpoint(model, DIR)`` writes one.

    DIR/config.json          the ModelConfig fields
    DIR/model.safetensors    the weights, under Meta's parameter names (a tied output head is stored once)
    DIR/tokenizer.model      the tokenizer, when there is one (tokenizer.json for non-sentencepiece ones)

Other writers put their files in such directories under their own names (``OUR_FILES``): an adapter
alone (peft/save_load.py), the state ``--resume`` needs (training/state.py), the chat template
(finetune/templates.py), a Hugging Face export (convert/).

Loading is strict: every missing or unexpected tensor, and every shape that does not match the config,
is named in the error. The model is built on the meta device (no memory, no random init) and each
tensor is read, checked and converted in turn (safetensors_file.py), so loading costs one copy of the
weights plus one tensor.

Saving is atomic and loses nothing of the user's: the files go to a new directory beside DIR under a
hidden, unique name (``.DIR.tmp-…``), which then replaces DIR by two renames (DIR to ``.DIR.old-…``,
the new one to DIR); a crash or Ctrl-C at any moment leaves the previous checkpoint complete, in DIR or,
for the instant between the renames, in the ``.old-`` directory the loader falls back to. An existing
DIR is replaced only when it holds nothing but files these writers make; a file, or a directory holding
anything else, is refused before anything is written.
"""

from __future__ import annotations

import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors.torch import save_file

from .cli import UsageError, one_line
from .config import ModelConfig
from .model import Llama
from .quantize import prepare_quantized_skeleton, use_kernel_layouts
from .safetensors_file import SafetensorsReader

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
# Files that belong with a tokenizer and travel with it into every checkpoint that copies it (a model
# fine-tuned from a converted one): its special tokens (a tokenizer.json needs tokenizer_config.json for
# BOS and EOS) and the chat template and generation config of a chat model (finetune/chat_template.py).
TOKENIZER_COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                        "generation_config.json")
PEFT_WEIGHTS, PEFT_CONFIG = "peft.safetensors", "peft.json"  # an adapter alone (peft/save_load.py)
STATE_FILE = "train_state.pt"  # what --resume needs besides the weights (training/state.py)
# Every file a program of this project writes into a model directory: a directory holding these and
# nothing else is one of ours, and may be replaced.
OUR_FILES = frozenset({CONFIG_FILE, WEIGHTS_FILE, *TOKENIZER_FILES, *TOKENIZER_COMPANIONS, PEFT_WEIGHTS, PEFT_CONFIG,
                       STATE_FILE, "generation.json", "adapter_config.json", "adapter_model.safetensors"})


def load_checkpoint(directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Llama:
    """The model stored in DIR, loaded strictly, on ``device``, its floating tensors in ``dtype`` (default:
    as stored). A quantised checkpoint (config.json's ``quantization``) gets its quantised layers before
    loading, so that its codes load as they are, never through a float copy (quantize.py)."""
    config, state = read_checkpoint(directory, device, dtype)
    with torch.device("meta"):
        model = Llama(config)
        if config.quantization:
            prepare_quantized_skeleton(model, config.quantization)
    put_weights(model, state, resolve_checkpoint_dir(directory) / WEIGHTS_FILE, assign=True)
    if config.quantization:
        use_kernel_layouts(model)
    return model


def save_checkpoint(model: Llama, directory: str | Path, tokenizer_path: str | Path | None = None) -> None:
    """Write ``model``'s config, weights and a copy of its tokenizer file to DIR, replacing it atomically."""
    with replace_directory(directory) as tmp:
        write_model_files(model, tmp, tokenizer_path)


# ---- reading ------------------------------------------------------------------------------------------

def read_checkpoint(directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                    names: list[str] | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """DIR's config and its tensors (all, or those ``names``), on ``device``, floating tensors in
    ``dtype`` (None: as stored).

    Tensor by tensor: each is read from the file into memory, checked, converted, and moved, so the
    peak is the converted model plus one tensor, never a whole second copy in the stored dtype. A
    damaged file, a config that is not ours, or a weight that is NaN or infinite is one error naming
    the file (and the tensor). Integer tensors (a quantised checkpoint's codes) keep their dtype.
    """
    directory = resolve_checkpoint_dir(directory)
    config = read_config(directory / CONFIG_FILE)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing; a checkpoint holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    reader = SafetensorsReader(weights)
    tensors = {}
    with reader.file:
        for name in reader.names if names is None else names:
            t = reader.get(name)
            # A non-finite element makes the sum non-finite: one reduction, no tensor-sized temporaries
            # (isfinite would build two); the elementwise check only confirms a suspicious sum.
            if t.is_floating_point() and not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
                raise UsageError(f"{weights}: tensor {name} holds NaN or infinite values; this checkpoint cannot be "
                                 "used (saved from a diverged run?): take an earlier one")
            tensors[name] = t.to(device=device, dtype=(dtype if t.is_floating_point() else None) or t.dtype)
            del t  # before the next read: one tensor as stored at a time
    return config, tensors


def read_config(path: Path) -> ModelConfig:
    """A checkpoint's config.json, or one error naming the file and what is wrong with it."""
    try:
        return ModelConfig.load(path)
    except (ValueError, TypeError) as e:  # not JSON, unknown fields, an impossible shape
        raise ValueError(f"{path}: not a llama_min model config ({one_line(e, 160)})") from None


def put_weights(model: Llama, state: dict[str, torch.Tensor], source: Path, assign: bool = False) -> None:
    """Load a checkpoint's tensors into ``model``, strictly: copied into its tensors, or with ``assign``
    made its tensors (a model built on the meta device). A tied output head is stored once."""
    tied = model.output.weight is model.tok_embeddings.weight  # a quantised head is a copy of its own
    check_state_dict({k: v.shape for k, v in stored_state_dict(model).items()}, state, str(source))
    if tied:
        state = {**state, "output.weight": state["tok_embeddings.weight"]}
    model.load_state_dict(state, strict=True, assign=assign)
    if assign and tied:  # assign made two Parameters; make them one again
        model.output.weight = model.tok_embeddings.weight


def resolve_checkpoint_dir(directory: str | Path) -> Path:
    """The directory to read: ``directory``, or the ``.old-`` directory a save interrupted between its two
    renames left beside it."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).exists():
        olds = [d for d in directory.parent.glob(f".{directory.name}.old-*") if (d / CONFIG_FILE).exists()]
        if not olds:
            raise FileNotFoundError(f"{directory} is not a llama_min checkpoint: no {CONFIG_FILE} in it (expected "
                                    "config.json + model.safetensors; convert other formats with weights_convert.py)")
        return max(olds, key=lambda d: d.stat().st_mtime)
    return directory


def tokenizer_file(directory: str | Path) -> Path | None:
    """The tokenizer file stored in a checkpoint directory, if any."""
    directory = resolve_checkpoint_dir(directory)
    return next((directory / n for n in TOKENIZER_FILES if (directory / n).exists()), None)


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
    """The tensors a checkpoint stores: the state dict, without the tied output head's second name (a
    quantised head is a copy of its own, stored)."""
    state = model.state_dict()
    if model.output.weight is model.tok_embeddings.weight:
        del state["output.weight"]
    return state


# ---- writing ------------------------------------------------------------------------------------------

def write_model_files(model: Llama, directory: Path, tokenizer_path: str | Path | None = None) -> None:
    """Write config, weights and tokenizer (with the files that belong to it: TOKENIZER_COMPANIONS) into
    an existing directory (not atomic on its own: inside ``replace_directory``)."""
    model.config.save(directory / CONFIG_FILE)
    tensors = {k: v.detach().contiguous().cpu() for k, v in stored_state_dict(model).items()}
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    (directory / WEIGHTS_FILE).chmod((directory / CONFIG_FILE).stat().st_mode)  # save_file makes it private (0600)
    if tokenizer_path is not None:
        tokenizer_path = Path(tokenizer_path)
        shutil.copyfile(tokenizer_path, directory / tokenizer_path.name)
        for name in TOKENIZER_COMPANIONS:
            if (tokenizer_path.parent / name).is_file():
                shutil.copyfile(tokenizer_path.parent / name, directory / name)


def check_replaceable(path: Path, ours: frozenset[str] = OUR_FILES) -> None:
    """Refuse to replace ``path`` unless it is absent or a directory holding only files named in ``ours``."""
    if path.is_symlink() or path.exists() and not path.is_dir():
        raise UsageError(f"{path} exists and is not a directory; it is not replaced: remove it or choose another path")
    others = sorted(p.name for p in path.iterdir() if p.name not in ours) if path.exists() else []
    if others:
        raise UsageError(f"{path} holds files this program did not write ({', '.join(others[:4])}"
                         f"{', ...' if len(others) > 4 else ''}); it is not replaced: choose another directory, or "
                         "move those files away")


def new_sibling(path: Path, kind: str) -> Path:
    """A new, empty directory beside ``path`` under a name no user picks (mkdir fails rather than reuse one)."""
    sibling = path.with_name(f".{path.name}.{kind}-{secrets.token_hex(6)}")
    sibling.mkdir()
    return sibling


@contextmanager
def replace_directory(path: str | Path, ours: frozenset[str] = OUR_FILES) -> Iterator[Path]:
    """Yield a new empty directory; when the block ends without error it replaces ``path`` (module docstring).
    ``path`` must be absent or hold only files named in ``ours``: checked before and after the block."""
    path = Path(path)
    check_replaceable(path, ours)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_sibling(path, "tmp")
    try:
        yield tmp
        check_replaceable(path, ours)  # again: a file may have been put there while we wrote
        if path.exists():
            old = new_sibling(path, "old")
            path.rename(old)  # onto the empty directory just made: no name a user owns is touched
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # only ours; gone already once renamed into place
        raise
