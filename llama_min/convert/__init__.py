"""Checkpoint conversion: Meta, Hugging Face, GGUF and llama_min checkpoints in; llama_min or Hugging
Face out. ``weights_convert.py`` is the command line; this package does the work.

    source = open_source(SRC)          # meta.py | hf.py | gguf.py | native.py: config + tensors by name
    convert(source, DST, to="hf")      # checked against the config, then streamed tensor by tensor

Everything about the set of tensors is checked before anything is written (``check_state_dict``, the
same strict check the checkpoint loader uses), the output goes to a temporary directory that replaces
DST only when complete (``replace_directory``), and the weights file is written one tensor at a time
(safetensors_file.py), so memory holds about one tensor plus whatever the source maps.

Beside the weights go the tokenizer files (for --to hf, a sentencepiece tokenizer.model gets the
tokenizer.json and tokenizer_config.json transformers needs: hf_tokenizer.py), the chat template and the
generation config (Source.write_chat_files); docs/tokenizers_and_templates.md is the user's view.

    source.py                            Source: what every reader gives (config, tensors by name, files)
    meta.py, hf.py, gguf.py, native.py   one reader per source format
    hf_tokenizer.py                      a sentencepiece tokenizer as transformers' tokenizer.json
    gguf_vocab.py, pretokenizers.py      a GGUF file's vocabulary as a tokenizer, and its pre-tokenizers
    verify.py                            --verify: the converted model's logits against the source's
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..checkpoint import (CONFIG_FILE, WEIGHTS_FILE, check_replaceable, check_state_dict, replace_directory,
                          stored_state_dict)
from ..cli import UsageError
from ..config import Quantization
from ..model import Llama
from ..hf_format import tensor_to_hf
from ..quantize import prepare_quantized_skeleton, quantized_layer_names, quantized_tensors
from ..safetensors_file import SafetensorsStream
from .hf_tokenizer import TOKENIZER_JSON, write_for_transformers
from .gguf import GGUFSource, is_gguf_file
from .hf import HFSource, hf_config_json, is_hf_dir
from .meta import MetaSource, is_meta_dir
from .native import LlamaMinSource, is_llama_min_dir
from .source import ConversionError, Source, one_line

__all__ = ["ConversionError", "Source", "open_source", "convert", "convert_adapter", "DTYPES", "TARGETS"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TARGETS = ("llama_min", "hf", "peft")  # peft: a LoRA adapter directory of train.py, in Hugging Face's PEFT layout


def open_source(path: str | Path) -> Source:
    """Detect SRC's format from what it contains and open it (headers and memory maps only)."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: does not exist")
    if is_gguf_file(path):
        return GGUFSource(path)
    if path.is_dir():
        if is_meta_dir(path):
            return MetaSource(path)
        if is_hf_dir(path):
            return HFSource(path)
        if is_llama_min_dir(path):
            return LlamaMinSource(path)
    raise ConversionError(
        f"{path}: unknown checkpoint format; expected a Meta directory (params.json + consolidated.NN.pth), "
        "a Hugging Face directory (config.json + model*.safetensors or pytorch_model*.bin), "
        "a llama_min checkpoint (config.json + model.safetensors) or a .gguf file")


@dataclass
class Converted:
    """What a conversion wrote, for the report."""
    path: Path
    to: str
    dtype: torch.dtype
    n_tensors: int
    n_bytes: int
    note: str | None


def expected_shapes(source: Source) -> dict[str, tuple[int, ...]]:
    """Our tensor names and shapes for the source's config (a model built on the meta device: no memory)."""
    with torch.device("meta"):
        model = Llama(source.config)
    return {name: tuple(t.shape) for name, t in stored_state_dict(model).items()}


def check_source(source: Source) -> dict[str, tuple[int, ...]]:
    """Every tensor present, none unexpected, every shape as the config says; else one error naming them."""
    expected = expected_shapes(source)
    found = {name: torch.empty(shape, device="meta") for name, shape in source.shapes.items()}
    try:
        check_state_dict(expected, found, str(source.weights_file))
    except ValueError as e:
        raise ConversionError(one_line(e)) from e
    return expected


def check_destination(dst: Path, src: Path, force: bool) -> None:
    """Refuse a destination whose replacement would lose anything: the source itself or a directory
    that contains it, and (even with --force) anything but a directory of files this project writes.
    A destination inside the source directory is fine: nothing of the source is touched."""
    d, s = dst.resolve(), src.resolve()
    if d == s or d in s.parents:
        raise ConversionError(f"{dst}: {'is' if d == s else 'contains'} the source {src}; writing there would replace "
                              "it: choose a destination outside it")
    if not dst.exists():
        return
    if not force:
        raise ConversionError(f"{dst}: already exists; choose another destination or pass --force to replace it")
    check_replaceable(dst)  # even with --force: only a directory of files we write


def convert_adapter(src: str | Path, dst: str | Path, force: bool = False, base_hf: str | Path | None = None) -> dict:
    """--to peft: a LoRA adapter directory written by train.py, in Hugging Face's PEFT layout. ``base_hf``:
    the Hugging Face export of its base, recorded as base_model_name_or_path (default: the base it records)."""
    from ..peft.export_hf import export_adapter_dir_to_hf

    src, dst = Path(src), Path(dst)
    if not (src / "peft.json").is_file():
        raise ConversionError(f"{src}: --to peft converts an adapter directory written by train.py --method lora "
                              "(peft.json + peft.safetensors, e.g. OUT_DIR/peft); this is not one")
    if base_hf is not None and not is_hf_dir(Path(base_hf)):
        raise ConversionError(f"--base_hf {base_hf}: not a Hugging Face model directory (no config.json with "
                              "hidden_size); export the base first: weights_convert.py BASE_CKPT DIR --to hf")
    check_destination(dst, src, force)
    try:
        return export_adapter_dir_to_hf(src, dst, base_hf)
    except (ValueError, FileNotFoundError) as e:
        raise ConversionError(f"{src}: {one_line(e)}") from e


def complete_for_transformers(directory: Path, config) -> str | None:
    """A sentencepiece tokenizer.model without a tokenizer.json does not load in transformers (it guesses
    a tiktoken file): add tokenizer.json, and tokenizer_config.json unless there is one (hf_tokenizer.py)."""
    model_file = directory / "tokenizer.model"
    if not model_file.is_file() or (directory / TOKENIZER_JSON).is_file():
        return None
    return write_for_transformers(model_file, directory, config.max_seq_len)


def quantized_layout(config, scheme: Quantization, dtype: torch.dtype) -> tuple[dict, dict[str, list[str]]]:
    """For --quantize: the quantised checkpoint's layout (name -> (shape, dtype); floating tensors outside
    the quantised layers in ``dtype``) and, per source tensor, the quantised layers made from it (a tied
    head is made from the embedding, which is stored as well)."""
    with torch.device("meta"):
        skeleton = Llama(config)
        tied = skeleton.output.weight is skeleton.tok_embeddings.weight
        prepare_quantized_skeleton(skeleton, scheme)
    layers = quantized_layer_names(skeleton)
    made_from: dict[str, list[str]] = {}
    for layer in layers:
        made_from.setdefault("tok_embeddings.weight" if tied and layer == "output" else f"{layer}.weight", []).append(layer)
    layout = {name: (tuple(t.shape), t.dtype if name.rpartition(".")[0] in layers else dtype)
              for name, t in stored_state_dict(skeleton).items()}
    return layout, made_from


def convert(source: Source, dst: str | Path, to: str = "llama_min", dtype: torch.dtype | None = None,
            force: bool = False, quantize: Quantization | None = None) -> Converted:
    """Write ``source`` to directory ``dst`` as a llama_min checkpoint or a Hugging Face model; with
    ``quantize``, a llama_min checkpoint whose linear layers are quantised (quantize.py)."""
    if to not in ("llama_min", "hf"):
        raise ConversionError(f"unknown target {to!r}; choose one of {TARGETS}")
    if quantize and to != "llama_min":
        raise ConversionError("--quantize writes a llama_min checkpoint (for generate.py); drop --to hf or --quantize")
    if source.config.quantization:
        raise ConversionError(f"{source.path} is already quantised ({source.config.quantization.kind}); convert the "
                              "float checkpoint it was made from instead")
    dst = Path(dst)
    check_destination(dst, Path(source.path), force)
    dtype = dtype or source.dtype
    shapes = check_source(source)
    config = source.config

    def out(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The tensor(s) written for source tensor ``name``."""
        if to == "hf":
            return [tensor_to_hf(name, tensor, config)]
        if not quantize:
            return [(name, tensor)]
        layers = made_from.get(name, [])
        kept = [(name, tensor)] if not layers or name == "tok_embeddings.weight" else []  # a tied embedding stays
        return kept + [kv for layer in layers for kv in quantized_tensors(layer, tensor.float(), quantize).items()]

    if quantize:
        layout, made_from = quantized_layout(config, quantize, dtype)
        config = replace(config, quantization=quantize)
    else:
        layout = {out(name, torch.empty(shape, device="meta"))[0][0]: (shape, dtype) for name, shape in shapes.items()}
    with replace_directory(dst) as tmp:
        stream = SafetensorsStream(tmp / WEIGHTS_FILE, layout, metadata={"format": "pt"})
        with stream.file:  # closed on an error too, before replace_directory removes tmp
            for name in shapes:  # one tensor in memory at a time
                try:
                    tensor = source.read(name)
                except UsageError:  # already one line naming the file and the tensor
                    raise
                except Exception as e:  # a damaged file that passed the header checks
                    raise ConversionError(f"{source.weights_file}: tensor {name} cannot be read: {one_line(e)}") from e
                for written_name, written in out(name, tensor):
                    stream.write(written_name, written.to(layout[written_name][1]))
        stream.close()
        if to == "llama_min":
            config.save(tmp / CONFIG_FILE)
        else:
            (tmp / CONFIG_FILE).write_text(json.dumps(hf_config_json(source, dtype), indent=2) + "\n")
        note = source.write_tokenizer(tmp)
        source.write_chat_files(tmp)
        if to == "hf":
            note = complete_for_transformers(tmp, config) or note
    n_bytes = sum(math.prod(shape) * tensor_dtype.itemsize for shape, tensor_dtype in layout.values())
    return Converted(dst, to, dtype, len(layout), n_bytes, note)
