"""What every input format gives the converter: a config, and tensors under our names, one at a time.

A ``Source`` knows the names and shapes of all its tensors before reading any data (from file headers
and memory maps), so a conversion can be checked completely before a single byte is written, and
then streamed tensor by tensor.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import torch

from ..cli import UsageError, one_line
from ..config import ModelConfig
from ..finetune.chat_template import (CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE, read_chat_template,
                                      read_generation_config)


class ConversionError(UsageError):
    """Bad input: the message is one line naming the file (and the tensor) and what was expected."""


class Source:
    """Base of the four readers: MetaSource (meta.py), HFSource (hf.py), GGUFSource (gguf.py) and
    LlamaMinSource (native.py)."""

    format_name: str  # for messages: "Meta", "Hugging Face", ...
    path: Path  # SRC as given
    config: ModelConfig
    shapes: dict[str, tuple[int, ...]]  # our tensor name -> shape, for every tensor the source holds
    dtype: torch.dtype  # the source's own floating dtype, the default output dtype
    bos_id: int = 1
    eos_id: int | list[int] = 2
    tokenizer_note: str | None = None  # why a tokenizer the source has is not carried over

    @property
    def weights_file(self) -> Path:
        """The file that lists the tensors, for error messages about the set of tensors."""
        raise NotImplementedError

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (our name, our layout), in memory."""
        raise NotImplementedError

    def tokenizer_files(self) -> list[Path]:
        """Tokenizer files to copy beside the converted weights."""
        return []

    def write_tokenizer(self, directory: Path) -> str | None:
        """Put the tokenizer files into ``directory``; return a note for the user when there is one."""
        files = self.tokenizer_files()
        for f in files:
            shutil.copyfile(f, directory / f.name)
        return self.tokenizer_note or (None if files else "no tokenizer file in the source; none written")

    def chat_template(self) -> str | None:
        """The model's Jinja chat template, when the source carries one (finetune/chat_template.py)."""
        return read_chat_template(self.path) if self.path.is_dir() else None

    def generation_config(self) -> dict | None:
        """Hugging Face's generation_config.json (eos ids, sampling defaults), when the source has one."""
        return read_generation_config(self.path) if self.path.is_dir() else None

    def write_chat_files(self, directory: Path) -> None:
        """Carry the chat template and the generation config into ``directory``, under Hugging Face's
        file names, which llama_min's checkpoint directory uses too."""
        try:
            template, generation = self.chat_template(), self.generation_config()
        except ValueError as e:
            raise ConversionError(one_line(e)) from e
        if template is not None:
            (directory / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")
        if generation is not None:
            (directory / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")


def tokenizer_ids(path: Path | None, default: tuple[int, int] = (1, 2)) -> tuple[int, int]:
    """bos and eos ids of a tokenizer file, or ``default`` when there is none."""
    if path is None:
        return default
    from ..tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    return tok.bos_id, tok.eos_id


def read_json(path: Path) -> dict:
    """A JSON object from a file, or an error naming the file."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: not readable JSON ({one_line(e)})") from e
    if not isinstance(value, dict):
        raise ConversionError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


# What a torch.save of a state dict refers to by name: torch's rebuild functions and storage types, and
# the containers of a state dict.
SAFE_GLOBALS = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.dict", "builtins.list")


def pickle_globals(path: Path) -> list[str]:
    """The module.name of every class or function a pickle file refers to (each would be imported, and
    could be called, when it is unpickled), read with pickletools without unpickling anything. A zip
    (torch >= 1.6) holds its pickle in */data.pkl; the legacy format is pickles one after another."""
    import pickletools
    import zipfile

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            data = z.read(next((n for n in z.namelist() if n.endswith("data.pkl")), z.namelist()[0]))
    else:
        data = path.read_bytes()
    found, strings, stream = [], [], io.BytesIO(data)
    try:
        while stream.tell() < len(data):
            for op, arg, _ in pickletools.genops(stream):
                if op.name == "GLOBAL":
                    found.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(".".join(strings[-2:]))
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # a damaged stream: what was read so far is all there is to tell
        pass
    return list(dict.fromkeys(found))


def load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A PyTorch ``.pth``/``.bin`` state dict, unpickled with ``weights_only=True`` (a pickle can run
    arbitrary code; this mode only rebuilds tensors and plain containers). Memory-mapped when the file
    is in the zip format of torch >= 1.6; older files are read whole."""
    try:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # the legacy, non-zip format
    except Exception as e:
        foreign = [g for g in pickle_globals(path) if not g.startswith(SAFE_GLOBALS)]
        if foreign:
            raise ConversionError(f"{path}: refused: the pickle holds {', '.join(foreign[:3])}, not only tensors, and "
                                  "loading it could run code (it is read with weights_only=True); get the weights as "
                                  "safetensors, or re-save the state dict alone with torch.save") from e
        raise ConversionError(f"{path}: truncated or corrupt (torch.load could not read it: "
                              f"{one_line(e, 100)}); copy the file again") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return state
