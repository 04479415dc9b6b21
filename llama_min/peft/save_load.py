"""Adapter-only checkpoints: a directory of two files, written atomically (it replaces DIR as a whole).

    DIR/peft.safetensors   only the trainable tensors, under their names in model.state_dict()
    DIR/peft.json          {"method", "config": PeftConfig, "base_checkpoint", "base_config",
                            "base_fingerprint"}

``load_peft`` is strict: a base with a different config, a base of the same shape with other weights
(its fingerprint differs: ``apply.base_fingerprint``), or a missing, unexpected or mis-shaped tensor, is
an error that names what is wrong. ``base_checkpoint`` is stored as an absolute path, so the record
stays true from any working directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..checkpoint import PEFT_CONFIG, PEFT_WEIGHTS, check_state_dict, replace_directory
from ..cli import one_line
from ..config import ModelConfig, short
from ..model import Llama
from .apply import _peft_config, apply_peft, base_fingerprint, peft_state_dict, remove_peft
from .config import PeftConfig

# ModelConfig fields that change neither a tensor's shape nor what it means: a PEFT checkpoint may be
# loaded onto a base that differs in these.
_RUNTIME_FIELDS = ("max_seq_len",)


def save_peft(model: Llama, directory: str | Path, base_checkpoint: str | Path | None = None,
              tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write DIR/peft.safetensors and DIR/peft.json (replacing DIR atomically). ``base_checkpoint`` is
    recorded so that the adapter can be found with the base it was trained on. ``tensors``: the
    adapter's tensors when the model does not hold them whole (a model sharded across processes, whose
    trainable tensors were gathered first); by default ``peft_state_dict(model)``."""
    config = _peft_config(model)
    meta = {"method": config.method, "config": config.to_dict(),
            "base_checkpoint": None if base_checkpoint is None else str(Path(base_checkpoint).resolve()),
            "base_config": model.config.to_dict(), "base_fingerprint": model.peft_base_fingerprint}
    tensors = {k: v.contiguous().cpu() for k, v in (peft_state_dict(model) if tensors is None else tensors).items()}
    with replace_directory(directory) as tmp:
        save_file(tensors, tmp / PEFT_WEIGHTS, metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def read_peft_meta(directory: str | Path) -> dict:
    """peft.json of an adapter checkpoint (method, config, base_checkpoint, base_config)."""
    directory = Path(directory)
    for name in (PEFT_CONFIG, PEFT_WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a PEFT checkpoint: no {name} in it "
                                    f"(expected {PEFT_WEIGHTS} + {PEFT_CONFIG}, as written by save_peft)")
    path = directory / PEFT_CONFIG
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not valid JSON ({one_line(e, 80)}); the adapter is damaged: copy it again or "
                         "train it again") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object written by save_peft, found {short(meta)}")
    missing = [k for k in ("method", "config", "base_checkpoint", "base_config") if k not in meta]
    if missing:
        raise ValueError(f"{path} lacks the fields {missing}; was it written by save_peft?")
    fingerprint = meta.get("base_fingerprint")
    wrong = [k for k, want in (("config", dict), ("base_config", dict), ("base_checkpoint", (str, type(None))),
                               ("base_fingerprint", (dict, type(None)))) if not isinstance(meta[k] if k in meta else None, want)]
    if not wrong and fingerprint is not None and not all(
            isinstance(v, list) and all(type(x) in (int, float) for x in v) for v in fingerprint.values()):
        wrong.append("base_fingerprint")
    if wrong:
        raise ValueError(f"{path}: the fields {wrong} are not of the types save_peft writes (found "
                         f"{short({k: meta.get(k) for k in wrong}, 80)}); the file was edited or damaged: train the "
                         "adapter again")
    return meta


def _check_base(model_config: ModelConfig, meta: dict, directory: Path) -> None:
    # The recorded base is read back through ModelConfig, so that what older files leave implicit
    # (hidden_dim null or absent: the rule's width) compares as the model it describes.
    try:
        theirs = ModelConfig.from_dict(meta["base_config"]).to_dict()
    except ValueError as e:
        raise ValueError(f"{directory / PEFT_CONFIG}: its base_config is no model config ({one_line(e, 120)}); the "
                         "file was edited or damaged: train the adapter again") from None
    ours = model_config.to_dict()
    diffs = [f"{k}: {ours.get(k)!r} here, {theirs.get(k)!r} there" for k in sorted(set(ours) | set(theirs))
             if k not in _RUNTIME_FIELDS and ours.get(k) != theirs.get(k)]
    if diffs:
        raise ValueError(f"the PEFT checkpoint {directory} was trained on a base model with a different config "
                         f"({'; '.join(diffs)}); load it onto that base (recorded base checkpoint: "
                         f"{meta.get('base_checkpoint')})")


def _check_fingerprint(model: Llama, meta: dict, directory: Path) -> None:
    recorded = meta.get("base_fingerprint")
    if recorded is None:  # written before fingerprints were recorded
        return
    current = model.peft_base_fingerprint or base_fingerprint(model)
    # bfloat16 keeps 8 significant bits: a copy in it differs by at most 2^-8 relative; fine-tuning even one
    # layer moves its values by far more.
    differ = [name for name, values in recorded.items() if name not in current or
              not torch.allclose(torch.tensor(current[name]), torch.tensor(values), rtol=1e-2, atol=1e-6)]
    if differ:
        raise ValueError(f"the adapter {directory} was trained on another base model of the same shape (recorded "
                         f"base: {meta.get('base_checkpoint')}; its {differ[0]} differs from this model's): load it "
                         "onto that base, or skip this check (check_base=False; generate.py --allow_other_base) "
                         "if you know they are the same model")


def load_peft(model: Llama, directory: str | Path, check_base: bool = True) -> Llama:
    """Apply the adapter stored in DIR to ``model`` and load its tensors, strictly. A model that already
    carries an adapter gets it swapped: the old modules are removed first, so each adapter gives its
    own outputs on the same base. ``check_base=False`` skips comparing the base's fingerprint with
    the recorded one (the config must match in any case)."""
    directory = Path(directory)
    meta = read_peft_meta(directory)
    config = _config(meta, directory)
    _check_base(model.config, meta, directory)  # before the model's own adapter is touched
    if check_base:
        _check_fingerprint(model, meta, directory)
    if model.peft_config is not None:
        remove_peft(model)
    apply_peft(model, config)
    with torch.no_grad():
        model.load_state_dict(_read_weights(model, directory, config), strict=False)
    return model


def read_peft_weights(model: Llama, directory: str | Path) -> dict[str, torch.Tensor]:
    """DIR/peft.safetensors, checked against the adapter ``model`` already carries: the same method and
    config, trained on this base (its config and its fingerprint), every tensor present in its shape. train.py --resume copies them into its rebuilt adapter."""
    directory = Path(directory)
    meta = read_peft_meta(directory)
    config = _config(meta, directory)
    if config != model.peft_config:
        raise ValueError(f"{directory} holds {config}, but the model carries {model.peft_config}")
    _check_base(model.config, meta, directory)
    _check_fingerprint(model, meta, directory)
    return _read_weights(model, directory, config)


def _read_weights(model: Llama, directory: Path, config: PeftConfig) -> dict[str, torch.Tensor]:
    """DIR/peft.safetensors, every tensor of the adapter ``model`` carries present in its shape."""
    path = directory / PEFT_WEIGHTS
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({one_line(e, 80)}); the adapter is damaged: copy "
                         "it again or train it again") from None
    check_state_dict({k: v.shape for k, v in peft_state_dict(model).items()}, state, f"{path} ({config.method})")
    return state


def _config(meta: dict, directory: Path) -> PeftConfig:
    try:
        return PeftConfig.from_dict(meta["config"])
    except ValueError as e:
        raise ValueError(f"{directory / PEFT_CONFIG}: {one_line(e)}") from None
