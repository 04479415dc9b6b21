"""Export a LoRA trained here in the Hugging Face PEFT layout, to load with ``peft`` onto the Hugging Face
export of its base (``hf_format.state_dict_to_hf`` + ``config_to_hf``), from a model in memory
(``export_lora_to_hf``) or from an adapter directory (``weights_convert.py OUT/peft DST --to peft``):

    DIR/adapter_config.json          LoraConfig: r, lora_alpha, lora_dropout, target_modules (q_proj, ...)
    DIR/adapter_model.safetensors    base_model.model.<HF module>.lora_A.weight (r, in) / .lora_B.weight (out, r)

Names go through ``hf_format``'s table, as the base weights do. The rows of the q and k projections are
permuted there (Meta's interleaved rotary pairs -> Hugging Face's halves); the update B A must follow W,
and since the permutation acts on output rows, P (B A) = (P B) A: B is permuted, A is not.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import replace_directory
from ..config import ModelConfig
from ..hf_format import tensor_to_hf
from ..model import Llama
from .config import PeftConfig
from .lora import LoRALinear
from .save_load import PEFT_WEIGHTS, read_peft_meta

HF_ADAPTER_CONFIG, HF_ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def lora_to_hf(model: Llama) -> tuple[dict, dict]:
    """(adapter_config dict, tensors under PEFT's names) for a model carrying LoRA (unmerged or merged:
    A and B are the same either way)."""
    config = model.peft_config
    if config is None or config.method != "lora":
        raise ValueError("export_lora_to_hf needs a model with LoRA applied (apply_peft or load_peft with method lora)")
    tensors = {f"{name}.{ab}": getattr(m, ab).detach() for name, m in model.named_modules()
               if isinstance(m, LoRALinear) for ab in ("lora_a", "lora_b")}
    return lora_tensors_to_hf(config, model.config, tensors)


def lora_tensors_to_hf(config: PeftConfig, base: ModelConfig, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """The same from an adapter's tensors (``...wq.lora_a``, ``...wq.lora_b``, as peft.safetensors holds
    them) and its base's config, which the q/k permutation needs."""
    if config.method != "lora":
        raise ValueError(f"the Hugging Face PEFT layout holds LoRA adapters; this one is {config.method}, which PEFT "
                         "cannot load as it is (use it with generate.py --peft)")
    if config.train_norms:
        raise ValueError("this LoRA also trained the RMSNorm gains, which the PEFT LoRA layout has no place for: "
                         "merge it into the weights instead (train.py --merge) and convert that checkpoint")
    out, modules = {}, set()
    for key in sorted(k for k in tensors if k.endswith(".lora_b")):
        prefix = key.removesuffix("lora_b")
        hf_name, b = tensor_to_hf(prefix + "weight", tensors[key], base)  # permutes the rows of q/k's B
        stem = "base_model.model." + hf_name.removesuffix(".weight")
        out[f"{stem}.lora_A.weight"] = tensors[prefix + "lora_a"].contiguous().cpu()
        out[f"{stem}.lora_B.weight"] = b.contiguous().cpu()
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
    return adapter_config, out


def export_lora_to_hf(model: Llama, directory: str | Path) -> None:
    """Write DIR/adapter_config.json and DIR/adapter_model.safetensors (replacing DIR atomically)."""
    write_hf_adapter(*lora_to_hf(model), directory)


def export_adapter_dir_to_hf(source: str | Path, directory: str | Path, base_hf: str | Path | None = None) -> dict:
    """An adapter directory written by train.py (peft.json + peft.safetensors) -> the PEFT layout in DIR,
    without loading its base model. ``base_hf``: the base's Hugging Face export, recorded as
    base_model_name_or_path (default: the llama_min base the adapter records). Returns the adapter_config
    written."""
    meta = read_peft_meta(source)
    tensors = load_file(Path(source) / PEFT_WEIGHTS)
    adapter_config, out = lora_tensors_to_hf(PeftConfig.from_dict(meta["config"]),
                                             ModelConfig.from_dict(meta["base_config"]), tensors)
    adapter_config["base_model_name_or_path"] = str(Path(base_hf).resolve()) if base_hf else meta["base_checkpoint"]
    write_hf_adapter(adapter_config, out, directory)
    return adapter_config


def write_hf_adapter(adapter_config: dict, tensors: dict, directory: str | Path) -> None:
    with replace_directory(directory) as tmp:
        save_file(tensors, tmp / HF_ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / HF_ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n")
