"""Loading and saving a whole model: the entry points of the checkpoint directory format.

    DIR/config.json          the ModelConfig fields
    DIR/model.safetensors    the weights, under Meta's parameter names (a tied output head is stored once)
    DIR/tokenizer.model      the tokenizer, when there is one (tokenizer.json for non-sentencepiece ones)

``load_checkpoint(DIR)`` is ``Llama.from_checkpoint(DIR)`` and ``save_checkpoint(model, DIR)`` is
``model.save_checkpoint(DIR)``. How the files are read (strictly) and written (atomically) is in
checkpoint_files.py, which model.py uses too; this module sits above both, so neither imports it back.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint_files import (CONFIG_FILE, TOKENIZER_FILES, WEIGHTS_FILE, atomic_directory, check_state_dict,
                               read_checkpoint, resolve_checkpoint_dir, stored_state_dict, tokenizer_file,
                               write_model_files)
from .model import Llama

__all__ = ["CONFIG_FILE", "TOKENIZER_FILES", "WEIGHTS_FILE", "atomic_directory", "check_state_dict",
           "load_checkpoint", "read_checkpoint", "resolve_checkpoint_dir", "save_checkpoint", "stored_state_dict", "tokenizer_file",
           "write_model_files"]


def load_checkpoint(directory: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> Llama:
    """The model stored in DIR, on ``device``, its floating tensors in ``dtype`` (default: as stored)."""
    return Llama.from_checkpoint(directory, device=device, dtype=dtype)


def save_checkpoint(model: Llama, directory: str | Path, tokenizer_path: str | Path | None = None) -> None:
    """Write ``model`` (and a copy of the tokenizer file) to DIR, replacing it atomically."""
    model.save_checkpoint(directory, tokenizer_path=tokenizer_path)
