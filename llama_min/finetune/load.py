"""Loading a fine-tuned model for use: a checkpoint, the adapter trained on it, and optionally the model
θ(a) part of the way between the base and the fine-tuned one (``interpolate.py``). generate.py and the
experiments load models this way. Two ways to name the base θ₀ of ``--interpolate a``:

    --checkpoint BASE --peft ADAPTER --interpolate a        scale the adapter's contribution
    --checkpoint TUNED --base BASE --interpolate a          full or partial fine-tuning: mix the weights

With --peft the base tensors are the checkpoint's own; when the adapter also trained some of them (e.g.
the norms), their θ₀ is read back from the checkpoint's file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import load_checkpoint, read_checkpoint
from ..cli import UsageError
from ..model import Llama
from ..peft import load_peft
from .interpolate import interpolate_model_
from .l2sp import base_tensor_shapes


def check_interpolation_flags(a: float | None, peft: str | Path, base: str | Path) -> None:
    """The flags make sense together: a in [0, 1] and exactly one way to name the base (or, without
    --interpolate, no --base). Scripts call it before loading anything, so that a mistake costs no load time."""
    if a is None:
        if base:
            raise UsageError("--base is the base checkpoint for --interpolate a; give --interpolate too")
        return
    if not 0.0 <= a <= 1.0:
        raise UsageError(f"--interpolate {a}: expected a in [0, 1] (0: the base model, 1: the fine-tuned one)")
    if peft and base:
        raise UsageError("--interpolate takes either --peft ADAPTER (scale the adapter over --checkpoint) or "
                         "--base BASE (mix --checkpoint's weights with BASE's), not both")
    if not peft and not base:
        raise UsageError("--interpolate needs the base to move towards: --peft ADAPTER_DIR (scale an adapter) or "
                         "--base BASE_DIR (a fully or partially fine-tuned --checkpoint and its base)")


def load_finetuned(checkpoint: str | Path, peft: str | Path = "", base: str | Path = "",
                   interpolate: float | None = None, device: torch.device | str = "cpu",
                   dtype: torch.dtype | None = None, check_base: bool = True) -> Llama:
    """The model of ``checkpoint`` with the adapter ``peft`` applied (strictly; ``check_base``: see
    ``load_peft``) and, with ``interpolate`` a, moved to θ(a) between it and its base; in eval mode, on
    ``device``, weights in ``dtype``."""
    check_interpolation_flags(interpolate, peft, base)
    model = load_checkpoint(checkpoint, device=device, dtype=dtype)
    if peft:
        load_peft(model, peft, check_base=check_base)
        model.to(device=device, dtype=dtype)
    if interpolate is not None:
        # Which base tensors trained is read from requires_grad, as load_peft leaves it.
        shapes = base_tensor_shapes(model.config)  # the base tensors' names, also inside an adapted model
        trained = any(p.requires_grad for name, p in model.named_parameters() if name in shapes)
        source = base or (checkpoint if trained else "")
        base_state = read_checkpoint(source)[1] if source else None
        interpolate_model_(model, interpolate, base_state)
    return model.eval()
