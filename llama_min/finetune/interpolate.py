"""Weight-space interpolation between the base and the fine-tuned model (the weight-space ensemble of
WiSE-FT, Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"):

    θ(a) = (1 − a) · θ₀ + a · θ        a = 0: the base model;  a = 1: the fine-tuned model

Fine-tuning moves the weights along a direction that helps the task; stopping part of the way often
keeps most of the task accuracy while keeping more of what the base knew (less forgetting) and, the
paper finds, more robustness to inputs unlike the fine-tuning data. ``--interpolate a`` picks the point.

What θ is depends on the method; the same formula covers all of them:
- full and partial fine-tuning: every base tensor. Frozen tensors are equal in θ₀ and θ, so θ(a) = θ₀
  and they are left as they are.
- PEFT methods: the tensor each method initialises at zero so that the adapted model *is* the base
  (θ₀ = 0 there), so θ(a) = a · θ scales the method's whole contribution:
      LoRA             B              W + (alpha/r)·(a·B)·A  = W + a·ΔW
      LLaMA-Adapter    the gates      a·g ·(prompt attention); with gate_tanh the contribution is
                                      tanh(a·g)·(...), not linear in a but with the same endpoints
      bottleneck       up-projection  a + a·up(silu(down(a_in)))   (weight and bias)
  The other new tensors (LoRA's A, the prompts, the down-projection) only act through these, so
  they are left as trained.

Exact endpoints: the formula is evaluated as written, (1 − a)·θ₀ + a·θ, not as θ₀ + a·(θ − θ₀). With
a = 0 it is 1·θ₀ + 0·θ = θ₀ and with a = 1 it is 0·θ₀ + 1·θ = θ, bit for bit (finite weights), so the
endpoints give the base and the fine-tuned logits exactly; tests/test_robust.py checks it for every
method. The arithmetic runs in float32 and the result is cast back to the weight's dtype.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..peft.adapter import AdapterPrompt
from ..peft.bottleneck import Bottleneck
from ..checkpoint import check_state_dict
from .l2sp import base_tensor_shapes
from ..peft.lora import LoRALinear


def _check_coefficient(a: float) -> float:
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"interpolation coefficient a must be in [0, 1] (0: base model, 1: fine-tuned), got {a}")
    return float(a)


def interpolate_tensor(base: torch.Tensor, tuned: torch.Tensor, a: float) -> torch.Tensor:
    """(1 − a)·base + a·tuned, in float32, returned in tuned's dtype. Equal inputs come back as they are."""
    if torch.equal(base, tuned):  # a frozen tensor: θ(a) = θ₀ for every a, without rounding
        return tuned
    return ((1 - a) * base.float() + a * tuned.float()).to(tuned.dtype)


def interpolate_state_dicts(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor],
                            a: float) -> dict[str, torch.Tensor]:
    """θ(a) for two checkpoints of the same model (full or partial fine-tuning): the same keys and
    shapes in both, e.g. two ``model.safetensors`` files. Returns a new state dict."""
    a = _check_coefficient(a)
    check_state_dict({k: v.shape for k, v in tuned.items()}, base, "the base state dict")
    return {k: interpolate_tensor(base[k].to(v.device), v, a) for k, v in tuned.items()}


def zero_at_base(module: nn.Module) -> list[torch.Tensor]:
    """The tensors of a PEFT module whose value 0 makes the adapted model the base model."""
    if isinstance(module, LoRALinear):
        if module.merged:
            raise ValueError("cannot interpolate a merged LoRA layer (B A is already inside W): "
                             "interpolate before merge(), or unmerge() first")
        return [module.lora_b]
    if isinstance(module, AdapterPrompt):
        return [module.gate]
    if isinstance(module, Bottleneck):
        return [module.up.weight, module.up.bias]
    return []


@torch.no_grad()
def interpolate_model_(model: nn.Module, a: float,
                       base_state: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Move a fine-tuned model, in place, to θ(a) between it and its base. Returns the model.

    model: the fine-tuned Llama, with its PEFT modules (if any) installed and loaded.
    base_state: the base checkpoint's tensors (as stored in ``model.safetensors``), needed when base
        tensors were trained (full or partial fine-tuning, trained norms); None for PEFT alone. Which
        base tensors were trained is read from ``requires_grad``, as ``apply_peft`` and the trainer
        leave it, so a model with trainable base tensors and no base_state is refused.
    The change cannot be undone exactly: reload the fine-tuned weights to go back.
    """
    a = _check_coefficient(a)
    shapes = base_tensor_shapes(model.config)
    params = {name: p for name, p in model.named_parameters() if name in shapes}  # a tied head once
    found = False
    if base_state is None:
        trained = [name for name, p in params.items() if p.requires_grad]
        if trained:
            raise ValueError(f"base tensors of this model are trainable ({', '.join(trained[:3])}"
                             f"{', ...' if len(trained) > 3 else ''}): full or partial fine-tuning, or trained "
                             "norms, moved them; pass the base checkpoint's tensors as base_state")
    else:
        check_state_dict({name: p.shape for name, p in params.items()}, base_state, "the base state dict")
        for name, p in params.items():
            p.copy_(interpolate_tensor(base_state[name].to(p.device), p, a))
        found = True
    for module in model.modules():
        for t in zero_at_base(module):
            t.copy_(interpolate_tensor(torch.zeros_like(t), t, a))  # θ₀ = 0: the base
            found = True
    if not found:
        raise ValueError("nothing to interpolate: the model has no LoRA, adapter or bottleneck module; "
                         "for full or partial fine-tuning pass the base checkpoint's tensors as base_state")
    return model
