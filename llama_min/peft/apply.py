"""Composing a method's modules into a model, taking them out again, and merging LoRA.

``apply_peft(model, config)`` composes the method's modules into the model (into the hooks the core
leaves for them, or by replacing a projection with a LoRALinear holding the same weight: visible in
``print(model)``, no class is patched), freezes every base tensor and leaves only the new ones
trainable. Every new branch starts at zero, so the adapted model computes exactly what the base does.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..model import Llama
from ..rmsnorm import RMSNorm
from .adapter import AdapterPrompt, VisualProjection
from .bottleneck import Bottleneck
from .config import LORA_TARGETS, PeftConfig
from .lora import LoRALinear


def _lora_sites(model: Llama, targets) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute name) of every projection LoRA adapts."""
    sites = []
    for target in targets:
        if target == "output":
            sites.append((model, "output"))
        else:
            sites.extend((getattr(layer, LORA_TARGETS[target]), target) for layer in model.layers)
    return sites


def apply_peft(model: Llama, config: PeftConfig) -> Llama:
    """Add the method's modules, freeze every base tensor, and return the model (changed in place).
    The new tensors take the device and dtype of the model's weights."""
    if model.peft_config is not None:
        raise ValueError(f"the model already has {model.peft_config.method} applied; call remove_peft(model) first")
    mc: ModelConfig = model.config
    n_adapted = mc.n_layers if config.adapter_layers is None else config.adapter_layers
    if config.method == "adapter" and n_adapted > mc.n_layers:
        raise ValueError(f"adapter_layers {n_adapted} exceeds the model's {mc.n_layers} layers; "
                         f"choose at most {mc.n_layers}")
    model.peft_base_fingerprint = base_fingerprint(model)  # before anything of the base can change
    model.requires_grad_(False)
    weight = model.tok_embeddings.weight
    factory = dict(device=weight.device, dtype=weight.dtype)
    if config.method == "adapter":
        for layer in model.layers[mc.n_layers - n_adapted:]:  # the top L layers (section 3.1)
            layer.attention.prompt_adapter = AdapterPrompt(config.adapter_len, mc.dim, mc.n_heads,
                                                           mc.n_kv_heads, config.gate_tanh, **factory)
        if config.visual_dim:  # multimodal (section 4.3): one projection for every adapted layer's prompts
            model.visual_proj = VisualProjection(config.visual_dim, mc.dim, config.visual_hidden, **factory)
    elif config.method == "lora":
        for parent, name in _lora_sites(model, config.lora_targets):
            setattr(parent, name, LoRALinear(getattr(parent, name), config.lora_rank, config.lora_alpha,
                                             config.lora_dropout))
    else:
        for layer in model.layers:
            layer.attention_adapter = Bottleneck(mc.dim, config.bottleneck_dim, **factory)
            layer.ffn_adapter = Bottleneck(mc.dim, config.bottleneck_dim, **factory)
    if config.train_norms:
        # Kept so that remove_peft can give the base its own gains back.
        model.peft_base_norms = {n: p.detach().clone() for n, p in model.named_parameters()
                                 if n.endswith("norm.weight")}
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.weight.requires_grad_(True)
    model.peft_config = config
    return model


@torch.no_grad()
def base_fingerprint(model: Llama) -> dict[str, list[float]] | None:
    """A few numbers per base tensor that tell one base model from another of the same shape, even one
    where a single layer was fine-tuned: for every parameter, its first and last four values and its sum
    of squares. One pass over the weights, no tensor-sized temporaries, and stable across dtypes
    (compared with a tolerance), so a bfloat16 copy of a base matches its float32 original. None for a
    model on the meta device (shapes only)."""
    params = dict(model.named_parameters())
    if params["tok_embeddings.weight"].is_meta:
        return None
    out = {}
    for name, p in params.items():
        flat = p.detach().flatten()
        sum_sq = torch.linalg.vector_norm(flat, dtype=torch.float32).item() ** 2
        out[name] = [*flat[:4].float().tolist(), *flat[-4:].float().tolist(), sum_sq]
    return out


def _unwrap_lora(model: Llama) -> None:
    """Put a plain nn.Linear holding the same weight Parameter back in place of every LoRALinear."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                plain = nn.Linear(child.in_features, child.out_features, bias=False, device="meta")
                plain.weight = child.weight
                setattr(parent, name, plain)


def remove_peft(model: Llama) -> Llama:
    """Take the PEFT modules out again, leaving the base model (trained norm gains are restored; a
    merged LoRA is unmerged first, which gives W back up to float rounding) with every tensor
    trainable, as a fresh Llama is."""
    config = _peft_config(model)
    if config.method == "lora":
        for m in _lora_modules(model):
            m.unmerge()
        _unwrap_lora(model)
    for layer in model.layers:
        layer.attention.prompt_adapter = layer.attention_adapter = layer.ffn_adapter = None
    model.visual_proj = None
    base_norms = model.peft_base_norms
    if base_norms is not None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in base_norms.items():
                params[name].copy_(value)
    model.peft_config = model.peft_base_fingerprint = model.peft_base_norms = None
    return model.requires_grad_(True)


def _peft_config(model: Llama) -> PeftConfig:
    config = model.peft_config
    if config is None:
        raise ValueError("this model has no PEFT modules: call apply_peft(model, config) or load_peft(model, dir) first")
    return config


# ---- LoRA merging ---------------------------------------------------------------------------------

def _lora_modules(model: Llama) -> list[LoRALinear]:
    if _peft_config(model).method != "lora":
        raise ValueError(f"merging applies to LoRA only; this model has {model.peft_config.method}")
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model: Llama) -> Llama:
    """Fold (alpha / r) B A into every adapted W and drop the LoRA modules: a plain Llama whose weights
    include the update, at the base model's inference cost (Hu et al. 2021, section 4.2), ready for
    ``save_checkpoint`` (train.py --merge writes a full checkpoint this way). To switch one model between
    tasks instead, ``LoRALinear.merge`` / ``unmerge`` add and subtract the update in place."""
    modules = _lora_modules(model)
    if model.config.tie_embeddings and "output" in model.peft_config.lora_targets:
        raise ValueError("cannot merge LoRA into a tied output head: the update would change the token "
                         "embedding too; leave it unmerged, or do not target 'output' on tied models")
    for m in modules:
        m.merge()
    _unwrap_lora(model)
    model.peft_config = model.peft_base_fingerprint = model.peft_base_norms = None
    return model.requires_grad_(True)


def peft_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    """The tensors apply_peft made trainable (detached), under their names in model.state_dict()."""
    _peft_config(model)
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
