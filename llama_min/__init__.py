"""llama_min: a minimal, readable LLaMA in PyTorch.

Files, in the order a forward pass meets them: config, rmsnorm, rope, kv_cache, attention,
feedforward, block, model; then tokenizer, checkpoint (the directory format) and hf_format
(the Hugging Face layout).
"""

from .config import ModelConfig
from .generation import generate
from .model import IGNORE_INDEX, Llama
from .tokenizer import Tokenizer

__all__ = ["IGNORE_INDEX", "Llama", "ModelConfig", "Tokenizer", "generate"]
