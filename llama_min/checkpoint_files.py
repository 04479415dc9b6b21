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

import json
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors.torch import save_file

from .cli import UsageError, one_line
from .config import ModelConfig
from .quantize import prepare_quantized_skeleton, use_kernel_layouts

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
# safetensors' dtype codes; the integer ones hold the codes of quantised checkpoints (quantize.py)
DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8", torch.uint8: "U8"}
DTYPES = {code: dtype for dtype, code in DTYPE_NAMES.items()}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
# Files that belong with a tokenizer and travel with it into every checkpoint that copies it (a model
# fine-tuned from a converted one): its special tokens (a tokenizer.json needs tokenizer_config.json for
# BOS and EOS) and the chat template and generation config of a chat model (finetune/chat_template.py).
TOKENIZER_COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                        "generation_config.json")


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
    """The tensors a checkpoint stores: the state dict, without the tied output head's second name (a
    quantised head is a copy of its own, stored)."""
    state = model.state_dict()
    if model.output.weight is model.tok_embeddings.weight:
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
    """Write config, weights and tokenizer (with the files that belong to it: TOKENIZER_COMPANIONS) into
    an existing directory (not atomic on its own)."""
    model.config.save(directory / CONFIG_FILE)
    tensors = {k: v.detach().contiguous().cpu() for k, v in stored_state_dict(model).items()}
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    if tokenizer_path is not None:
        tokenizer_path = Path(tokenizer_path)
        shutil.copyfile(tokenizer_path, directory / tokenizer_path.name)
        for name in TOKENIZER_COMPANIONS:
            if (tokenizer_path.parent / name).is_file():
                shutil.copyfile(tokenizer_path.parent / name, directory / name)


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


class SafetensorsReader:
    """The tensors of a safetensors file, by name; the header is read and checked at once (a file
    shorter than its header says is reported with the first tensor it cuts), the data on demand.

    Plain reads into fresh tensors rather than a memory map: every page of a mapped file the process
    has touched stays in its resident set until the file is closed, so loading through a map would
    appear to (and on a tight machine, compete to) hold the whole file besides the model.
    (The format: https://github.com/huggingface/safetensors, "Format".)"""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.file = open(self.path, "rb")
            (n,) = struct.unpack("<Q", self.file.read(8))
            header = json.loads(self.file.read(n))
        except (OSError, struct.error, ValueError) as e:
            raise UsageError(f"{self.path}: not a readable safetensors file ({e}); the file is damaged: copy or convert it again") from None
        header.pop("__metadata__", None)
        self.data_start, size = 8 + n, self.path.stat().st_size
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][1]):
            begin, end = info["data_offsets"]
            if self.data_start + end > size:
                raise UsageError(f"{self.path}: truncated: tensor {name} ends at byte {self.data_start + end} "
                                      f"but the file has {size} bytes; copy it again")
            if info["dtype"] not in DTYPES:
                raise UsageError(f"{self.path}: tensor {name} has dtype {info['dtype']}; "
                                      f"expected one of {sorted(DTYPES)}")
            self.entries[name] = (DTYPES[info["dtype"]], tuple(info["shape"]), begin, end)
        self.names = list(header)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        tensor = torch.empty(shape, dtype=dtype)
        if end > begin:
            self.file.seek(self.data_start + begin)
            got = self.file.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            if got != end - begin:
                raise UsageError(f"{self.path}: truncated: tensor {name} has {got} of {end - begin} bytes")
        return tensor


def read_config(path: Path) -> ModelConfig:
    """A checkpoint's config.json, or one error naming the file and what is wrong with it."""
    try:
        return ModelConfig.load(path)
    except (ValueError, TypeError) as e:  # not JSON, unknown fields, an impossible shape
        raise ValueError(f"{path}: not a llama_min model config ({one_line(e, 160)})") from None


def load_model(cls, directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """Build ``cls(config)`` (a Llama) from DIR, loading its tensors strictly (``Llama.from_checkpoint``).

    The model is built on the meta device (no memory, no random init) and the loaded tensors are
    assigned to it, so loading costs one copy of the weights. A quantised checkpoint (config.json's
    ``quantization``) gets its quantised layers before loading, so its codes load as they are.
    """
    config, state = read_checkpoint(directory, device, dtype)
    with torch.device("meta"):
        model = cls(config)
        if config.quantization:
            prepare_quantized_skeleton(model, config.quantization)
    tied = model.output.weight is model.tok_embeddings.weight
    check_state_dict({k: v.shape for k, v in stored_state_dict(model).items()}, state,
                     str(resolve_checkpoint_dir(directory) / WEIGHTS_FILE))
    if tied:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:  # assign=True made two Parameters; make them one again
        model.output.weight = model.tok_embeddings.weight
    if config.quantization:
        use_kernel_layouts(model)
    return model


def save_model(model, directory: str | Path, tokenizer_path: str | Path | None = None) -> None:
    """Write the model's config, weights and tokenizer to DIR, replacing it atomically."""
    with atomic_directory(directory) as tmp:
        write_model_files(model, tmp, tokenizer_path)
