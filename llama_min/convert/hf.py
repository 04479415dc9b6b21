"""Reading a Hugging Face ``LlamaForCausalLM`` directory, and writing one.

    config.json                                         LlamaConfig (GQA, rope_theta, eps, tying, sizes)
    model.safetensors                                   one file, or
    model-0000N-of-0000M.safetensors + model.safetensors.index.json   shards and the name -> file map, or
    pytorch_model.bin / pytorch_model-0000N-of-0000M.bin + pytorch_model.bin.index.json   (pickles)
    tokenizer.model and/or tokenizer.json (+ tokenizer_config.json, special_tokens_map.json)
    chat_template.jinja, generation_config.json         carried as they are (finetune/chat_template.py)

Names, the q/k row permutation and the config keys all come from ``hf_format.py``; this file only finds
the tensors in the files.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..hf_format import DERIVED_HF_TENSORS, config_from_hf, config_to_hf, tensor_from_hf
from ..safetensors_file import SafetensorsReader
from .source import ConversionError, Source, load_pickle, one_line, read_json

HF_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


def is_hf_dir(directory: Path) -> bool:
    config = directory / "config.json"
    return config.is_file() and "hidden_size" in read_json(config)


def weight_files(directory: Path) -> tuple[Path, dict[str, Path] | None]:
    """(the file listing the tensors, {Hugging Face name: file} from an index or None for one file)."""
    for index_name in INDEX_FILES:
        index = directory / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index}: no weight_map (tensor name -> shard file) in it")
            files = {name: directory / f for name, f in weight_map.items()}
            for name, f in files.items():
                if not f.is_file():
                    raise ConversionError(f"{f}: missing shard (listed in {index} for tensor {name}); "
                                          "copy every shard the index names")
            return index, files
    for single in SINGLE_FILES:
        if (directory / single).is_file():
            return directory / single, None
    shards = sorted(p.name for p in directory.glob("*-of-*") if p.suffix in (".safetensors", ".bin"))
    if shards:
        raise ConversionError(f"{directory}: shards {shards[:2]}... but no index ({' or '.join(INDEX_FILES)}); "
                              "copy the index file too")
    raise ConversionError(f"{directory}: config.json but no weights; expected one of "
                          f"{', '.join(SINGLE_FILES + INDEX_FILES)}")


class PickleFile:
    """A ``.bin`` state dict, memory-mapped, behind SafetensorsReader's interface."""

    def __init__(self, path: Path):
        self.path, self.state = path, load_pickle(path)
        self.names = list(self.state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        dtype = self.state[name].dtype
        if not dtype.is_floating_point:
            raise ConversionError(f"{self.path}: tensor {name} has dtype {dtype}; expected a float tensor")
        return dtype

    def get(self, name: str) -> torch.Tensor:
        return self.state[name]


def open_file(path: Path) -> SafetensorsReader | PickleFile:
    return SafetensorsReader(path) if path.suffix == ".safetensors" else PickleFile(path)


def open_weight_files(directory: Path) -> tuple[Path, dict[str, SafetensorsReader | PickleFile]]:
    """(listing file, {name in the files: the file holding it}) for a directory of weights."""
    listing, index = weight_files(directory)
    if index is None:
        f = open_file(listing)
        return listing, {name: f for name in f.names}
    opened = {p: open_file(p) for p in sorted(set(index.values()))}
    by_name = {}
    for name, path in index.items():
        if name not in opened[path].names:
            raise ConversionError(f"{path}: tensor {name} is missing (the index {listing} says it is here)")
        by_name[name] = opened[path]
    return listing, by_name


class HFSource(Source):
    format_name = "Hugging Face"

    def __init__(self, directory: Path):
        self.path = directory
        hf = read_json(directory / "config.json")
        try:
            self.config = config_from_hf(hf)
        except KeyError as e:
            raise ConversionError(f"{directory / 'config.json'}: key {e} missing; a LlamaConfig has it") from e
        except ValueError as e:
            raise ConversionError(f"{directory / 'config.json'}: {one_line(e)}") from e
        self.bos_id, self.eos_id = hf.get("bos_token_id", 1), hf.get("eos_token_id", 2)
        self.listing, files = open_weight_files(directory)
        self.files: dict[str, tuple[str, SafetensorsReader | PickleFile]] = {}  # our name -> (Hugging Face name, file)
        for hf_name, f in files.items():
            if DERIVED_HF_TENSORS.match(hf_name):
                continue
            try:
                ours, _ = tensor_from_hf(hf_name, torch.empty(f.shape(hf_name), device="meta"), self.config)
            except KeyError:
                ours = hf_name  # not a LLaMA tensor: kept under its own name, reported as unexpected
            if ours == "output.weight" and self.config.tie_embeddings:
                continue  # some files store the tied head a second time
            self.files[ours] = (hf_name, f)
        self.shapes = {ours: f.shape(hf_name) for ours, (hf_name, f) in self.files.items()}
        hf_embed, f = self.files.get("tok_embeddings.weight", (None, None))
        self.dtype = f.dtype(hf_embed) if f else torch.float32

    @property
    def weights_file(self) -> Path:
        return self.listing

    def read(self, name: str) -> torch.Tensor:
        hf_name, f = self.files[name]
        return tensor_from_hf(hf_name, f.get(hf_name), self.config)[1]

    def tokenizer_files(self) -> list[Path]:
        return [self.path / n for n in HF_TOKENIZER_FILES if (self.path / n).is_file()]


def hf_config_json(source: Source, dtype: torch.dtype) -> dict:
    """config.json for a ``--to hf`` export: hf_format's LlamaConfig, with the ids and dtype written."""
    config = config_to_hf(source.config, bos_id=source.bos_id, eos_id=source.eos_id)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    return config
