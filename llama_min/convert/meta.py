"""Reading Meta's release format: ``params.json`` + ``consolidated.NN.pth`` (+ ``tokenizer.model``).

Meta's names are ours (model.py uses Meta's state-dict keys), and Meta's rotary pairing is ours, so no
tensor is renamed or permuted. Large models come as N model-parallel shards, one per GPU of the
original run (LLaMA section 2.4; Megatron-LM, Shoeybi et al. 2019, section 3): each shard holds a slice
of every matrix, cut the way the layer was parallelised:

- column-parallel layers (wq, wk, wv, w1, w3, output) split their *output* features: rows, dim 0;
- row-parallel layers (wo, w2) split their *input* features: columns, dim 1;
- the token embedding is split along the embedding width: dim 1;
- norm gains are replicated in every shard.

Merging concatenates the slices along the same dimension. ``rope.freqs`` (a derived table) is dropped.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..config import ModelConfig
from .source import ConversionError, Source, load_pickle, one_line, read_json, tokenizer_ids

SHARD = re.compile(r"consolidated\.(\d+)\.pth$")
DERIVED = ("rope.freqs",)


def concat_dim(name: str) -> int | None:
    """The dimension model-parallel shards split ``name`` along; None for replicated tensors."""
    if name.endswith("norm.weight"):
        return None
    if name == "tok_embeddings.weight" or name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return 1
    return 0


def is_meta_dir(directory: Path) -> bool:
    return (directory / "params.json").is_file() and any(SHARD.search(p.name) for p in directory.iterdir())


class MetaSource(Source):
    format_name = "Meta"

    def __init__(self, directory: Path):
        self.path = directory
        found = sorted((int(SHARD.search(p.name).group(1)), p) for p in directory.iterdir() if SHARD.search(p.name))
        self.shard_files = [p for _, p in found]
        self.shards = [load_pickle(self.shard_files[0])]
        first = self.shards[0]
        n_shards = self._expected_shards(first)
        for i in range(n_shards):
            f = directory / f"consolidated.{i:02d}.pth"
            if not f.is_file():
                raise ConversionError(f"{f}: missing shard {i} of {n_shards} (layers.0.attention.wq.weight in "
                                      f"{self.shard_files[0].name} holds 1/{n_shards} of its rows); copy every shard")
        extra = [p.name for p in self.shard_files[n_shards:]]
        if extra:
            raise ConversionError(f"{directory}: {n_shards} shards expected from the tensor sizes, but also found {extra}")
        self.shard_files = [directory / f"consolidated.{i:02d}.pth" for i in range(n_shards)]
        self.shards += [load_pickle(f) for f in self.shard_files[1:]]

        self.names = [n for n in first if n not in DERIVED]
        self.shapes = {n: self._merged_shape(n) for n in self.names}
        embed = first.get("tok_embeddings.weight")
        self.dtype = embed.dtype if embed is not None else torch.float32
        params = directory / "params.json"
        declared = read_json(params)
        try:
            # LLaMA-1's params.json says vocab_size -1 (the tokenizer decides): the embedding tells
            vocab = self.shapes.get("tok_embeddings.weight", (0,))[0]
            overrides = {"vocab_size": vocab} if declared.get("vocab_size", -1) <= 0 else {}
            self.config = ModelConfig.from_params_json(params, **overrides)
        except (ValueError, TypeError) as e:
            raise ConversionError(f"{params}: {one_line(e)}") from e
        self.tokenizer = next((d / "tokenizer.model" for d in (directory, directory.parent)
                               if (d / "tokenizer.model").is_file()), None)
        try:
            self.bos_id, self.eos_id = tokenizer_ids(self.tokenizer)
        except Exception as e:  # Llama 3's tokenizer.model is a tiktoken file, not sentencepiece
            self.tokenizer_note = (f"{self.tokenizer} is not a sentencepiece model ({one_line(e, 80)}); not copied. "
                                   "Llama 3 ships a tiktoken file: take tokenizer.json from its Hugging Face release")
            self.tokenizer = None

    @staticmethod
    def _expected_shards(first: dict[str, torch.Tensor]) -> int:
        """Shard count implied by the first shard: wq is split by rows, and it is square (dim x dim)."""
        wq = first.get("layers.0.attention.wq.weight")
        if wq is None or wq.shape[1] % wq.shape[0]:
            return 1  # nothing to infer from; a wrong count then shows up as wrong shapes
        return wq.shape[1] // wq.shape[0]

    def _merged_shape(self, name: str) -> tuple[int, ...]:
        dim = concat_dim(name)
        for f, shard in zip(self.shard_files, self.shards):
            if name not in shard:
                raise ConversionError(f"{f}: tensor {name} is missing (it is in {self.shard_files[0].name}; "
                                      "every shard holds a slice of every tensor)")
        shape = list(self.shards[0][name].shape)
        if dim is not None and len(shape) > dim:
            shape[dim] = sum(s[name].shape[dim] for s in self.shards)
        return tuple(shape)

    @property
    def weights_file(self) -> Path:
        return self.shard_files[0]

    def read(self, name: str) -> torch.Tensor:
        dim = concat_dim(name)
        if dim is None or len(self.shards) == 1:
            return self.shards[0][name]
        return torch.cat([s[name] for s in self.shards], dim=dim)

    def tokenizer_files(self) -> list[Path]:
        return [self.tokenizer] if self.tokenizer else []
