"""llama_min: a minimal, readable LLaMA in PyTorch.

The model first, one idea per file, in the order a forward pass meets them: config, rmsnorm, rope,
kv_cache, attention, feedforward, block, model; then tokenizer, generation, checkpoint (a model
directory: load_checkpoint, save_checkpoint; its weights file through safetensors_file) and hf_format
(the model's Hugging Face names). What the
scripts share is cli.py. Around them, sub-packages
named for their job: peft/ (LLaMA-Adapter, LoRA, bottleneck adapters), finetune/ (instruction data,
templates, robust fine-tuning), training/ (what train.py's loop calls), from_scratch/ (what the rest takes from a library, written out:
byte-level BPE, cross-entropy, AdamW, clipping, a training loop), convert/ (weights_convert.py).
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import ModelConfig
from .generation import generate
from .model import IGNORE_INDEX, Llama
from .tokenizer import Tokenizer, load_tokenizer

__all__ = ["IGNORE_INDEX", "Llama", "ModelConfig", "Tokenizer", "generate", "load_checkpoint", "load_tokenizer",
           "save_checkpoint"]
