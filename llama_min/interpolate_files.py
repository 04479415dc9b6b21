"""The ``--interpolate a`` flag of generate.py and lab/evaluate.py: θ(a) (``llama_min.interpolate``)
for a model loaded from checkpoint files. Two ways to name the base θ₀:

    --checkpoint BASE --peft ADAPTER --interpolate a        scale the adapter's contribution
    --checkpoint TUNED --base BASE --interpolate a          full or partial fine-tuning: mix the weights

With --peft the base tensors are the checkpoint's own; when the adapter also trained some of them (e.g.
the norms), their θ₀ is read back from the checkpoint's file.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from .checkpoint import WEIGHTS_FILE, resolve_checkpoint_dir
from .interpolate import interpolate_model_
from .l2sp import base_tensor_shapes


def check_interpolation_flags(a: float, peft: str | Path, base: str | Path) -> None:
    """The flags make sense together: a in [0, 1] and exactly one way to name the base. Scripts call
    it before loading anything, so that a mistake costs no load time."""
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"--interpolate {a}: expected a in [0, 1] (0: the base model, 1: the fine-tuned one)")
    if peft and base:
        raise ValueError("--interpolate takes either --peft ADAPTER (scale the adapter over --checkpoint) or "
                         "--base BASE (mix --checkpoint's weights with BASE's), not both")
    if not peft and not base:
        raise ValueError("--interpolate needs the base to move towards: --peft ADAPTER_DIR (scale an adapter) or "
                         "--base BASE_DIR (a fully or partially fine-tuned --checkpoint and its base)")


def interpolate_from_files_(model: nn.Module, a: float, checkpoint: str | Path, peft: str | Path = "",
                            base: str | Path = "") -> nn.Module:
    """Move ``model`` (loaded from ``checkpoint``, with the adapter ``peft`` applied if given) in place
    to θ(a) between it and its base. Call it before anything sets ``requires_grad`` (it reads which base
    tensors were trained from it). Errors are one line naming the flag to fix."""
    check_interpolation_flags(a, peft, base)
    shapes = base_tensor_shapes(model.config)  # the base tensors' names, also inside an adapted model
    trained = any(p.requires_grad for name, p in model.named_parameters() if name in shapes)
    source = base or (checkpoint if trained else "")
    base_state = load_file(resolve_checkpoint_dir(source) / WEIGHTS_FILE) if source else None
    return interpolate_model_(model, a, base_state)

