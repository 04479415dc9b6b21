"""What a PEFT run reports: how many parameters train, per module group (``parameter_table``), and how
far each layer's adapter has moved from the base while it trains (``peft_stats``, logged by train.py)."""

from __future__ import annotations

import re

import torch
from torch import nn

from ..model import Llama
from .adapter import AdapterPrompt
from .lora import LoRALinear


@torch.no_grad()
def peft_stats(model: Llama) -> dict[str, list[float]]:
    """How much each layer's adapter does, for watching it learn (train.py logs it in metrics.jsonl):
    LLaMA-Adapter's gate factor (g, or tanh(g) with gate_tanh) averaged over the heads, and LoRA's
    ‖(alpha/r)·B·A‖_F over the layer's adapted projections; one value per layer, in layer order (an
    unadapted layer gives 0). Empty for a model without these methods."""
    stats: dict[str, list[float]] = {}
    for layer in model.layers:
        prompt = layer.attention.prompt_adapter
        if isinstance(prompt, AdapterPrompt):
            gate = torch.tanh(prompt.gate) if prompt.gate_tanh else prompt.gate
            stats.setdefault("adapter_gate", []).append(gate.float().mean().item())
        loras = [m for m in layer.modules() if isinstance(m, LoRALinear)]
        if loras:
            stats.setdefault("lora_delta_norm", []).append(
                sum(m.delta_weight().pow(2).sum().item() for m in loras) ** 0.5)
    if "adapter_gate" in stats:  # adapted top layers only: the ones below read 0
        stats["adapter_gate"] = [0.0] * (len(model.layers) - len(stats["adapter_gate"])) + stats["adapter_gate"]
    return stats


def parameter_table(model: nn.Module) -> str:
    """A text table of trainable and total parameters per module group: the module that owns each
    tensor, with layer numbers replaced by * so that the n_layers copies count as one row."""
    groups: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        group = re.sub(r"(^|\.)layers\.\d+\.", r"\1layers.*.", name).rpartition(".")[0] or name
        counts = groups.setdefault(group, [0, 0])
        counts[0] += p.numel() if p.requires_grad else 0
        counts[1] += p.numel()
    trainable, total = sum(c[0] for c in groups.values()), sum(c[1] for c in groups.values())
    width = max(len("total"), *(len(g) for g in groups))
    lines = [f"{'module group':<{width}}  {'trainable':>13}  {'total':>15}"]
    lines += [f"{g:<{width}}  {t:>13,}  {n:>15,}" for g, (t, n) in groups.items()]
    lines.append(f"{'total':<{width}}  {trainable:>13,}  {total:>15,}  ({100 * trainable / max(total, 1):.3f}% trainable)")
    return "\n".join(lines)
