"""llama_min: a minimal, readable LLaMA in PyTorch.

The model first, one idea per file, in the order a forward pass meets them (config, rmsnorm, rope,
kv_cache, attention, feedforward, block, model), then what uses it (tokenizer, generation, checkpoint,
...); around them, sub-packages named for their job (peft/, finetune/, training/, from_scratch/,
convert/), each listing its files in its own docstring. README.md's module table says what each file
implements and from which paper.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import ModelConfig
from .generation import generate
from .model import IGNORE_INDEX, Llama
from .tokenizer import Tokenizer, load_tokenizer

__all__ = ["IGNORE_INDEX", "Llama", "ModelConfig", "Tokenizer", "generate", "load_checkpoint", "load_tokenizer",
           "save_checkpoint"]
