"""Reading our own checkpoint directory (checkpoint.py's format) as a conversion source, for export
to Hugging Face (``llama_min -> hf``) or to change its dtype."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import CONFIG_FILE, TOKENIZER_FILES, WEIGHTS_FILE, tokenizer_file
from ..config import ModelConfig
from ..safetensors_file import SafetensorsReader
from .source import ConversionError, Source, one_line, read_json, tokenizer_ids


def is_llama_min_dir(directory: Path) -> bool:
    config = directory / CONFIG_FILE
    return config.is_file() and "n_layers" in read_json(config)


class LlamaMinSource(Source):
    format_name = "llama_min"

    def __init__(self, directory: Path):
        self.path = directory
        try:
            self.config = ModelConfig.load(directory / CONFIG_FILE)
        except (ValueError, TypeError) as e:
            raise ConversionError(f"{directory / CONFIG_FILE}: {one_line(e)}") from e
        self.file = directory / WEIGHTS_FILE
        if not self.file.is_file():
            raise ConversionError(f"{self.file}: missing; a llama_min checkpoint holds {CONFIG_FILE} and {WEIGHTS_FILE}")
        self.reader = SafetensorsReader(self.file)
        self.shapes = {n: self.reader.shape(n) for n in self.reader.names}
        embed = "tok_embeddings.weight"
        # (a missing embedding is reported with the other missing tensors by the converter)
        self.dtype = self.reader.dtype(embed) if embed in self.shapes else torch.float32
        self.bos_id, self.eos_id = tokenizer_ids(tokenizer_file(directory))

    @property
    def weights_file(self) -> Path:
        return self.file

    def read(self, name: str) -> torch.Tensor:
        return self.reader.get(name)

    def tokenizer_files(self) -> list[Path]:
        names = TOKENIZER_FILES + ("tokenizer_config.json", "special_tokens_map.json")  # as HFSource copies them
        return [self.path / n for n in names if (self.path / n).is_file()]
