"""Export a LoRA trained here in the Hugging Face PEFT layout, to load with ``peft`` onto the Hugging Face
export of its base (``hf_format.state_dict_to_hf`` + ``config_to_hf``):

    DIR/adapter_config.json          LoraConfig: r, lora_alpha, lora_dropout, target_modules (q_proj, ...)
    DIR/adapter_model.safetensors    base_model.model.<HF module>.lora_A.weight (r, in) / .lora_B.weight (out, r)

Names go through ``hf_format``'s table, as the base weights do. The rows of the q and k projections are
permuted there (Meta's interleaved rotary pairs -> Hugging Face's halves); the update B A must follow W,
and since the permutation acts on output rows, P (B A) = (P B) A: B is permuted, A is not.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from ..checkpoint import atomic_directory
from ..convert.hf_format import tensor_to_hf
from .lora import LoRALinear
from ..model import Llama

HF_ADAPTER_CONFIG, HF_ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def lora_to_hf(model: Llama) -> tuple[dict, dict]:
    """(adapter_config dict, tensors under PEFT's names) for a model carrying LoRA (unmerged or merged:
    A and B are the same either way)."""
    config = getattr(model, "peft_config", None)
    if config is None or config.method != "lora":
        raise ValueError("export_lora_to_hf needs a model with LoRA applied (apply_peft or load_peft with method lora)")
    tensors, modules = {}, set()
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            hf_name, b = tensor_to_hf(f"{name}.weight", m.lora_b.detach(), model.config)  # permutes q/k rows
            stem = "base_model.model." + hf_name.removesuffix(".weight")
            tensors[f"{stem}.lora_A.weight"] = m.lora_a.detach().contiguous().cpu()
            tensors[f"{stem}.lora_B.weight"] = b.contiguous().cpu()
            modules.add(stem.rpartition(".")[2])  # q_proj, v_proj, lm_head, ...
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config.lora_rank,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": sorted(modules),
        "bias": "none",
        "fan_in_fan_out": False,  # our A, B are stored (out, in) like nn.Linear weights
        "use_rslora": False,  # scale alpha / r, not alpha / sqrt(r)
        "inference_mode": True,
        "base_model_name_or_path": None,
    }
    return adapter_config, tensors


def export_lora_to_hf(model: Llama, directory: str | Path) -> None:
    """Write DIR/adapter_config.json and DIR/adapter_model.safetensors (replacing DIR atomically)."""
    adapter_config, tensors = lora_to_hf(model)
    with atomic_directory(directory) as tmp:
        save_file(tensors, tmp / HF_ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / HF_ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n")
