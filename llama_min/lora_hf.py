"""Kept for scripts written against the old layout: the LoRA export now lives in llama_min.peft.export_hf."""

from .peft.export_hf import HF_ADAPTER_CONFIG, HF_ADAPTER_WEIGHTS, export_lora_to_hf, lora_to_hf

__all__ = ["HF_ADAPTER_CONFIG", "HF_ADAPTER_WEIGHTS", "export_lora_to_hf", "lora_to_hf"]
