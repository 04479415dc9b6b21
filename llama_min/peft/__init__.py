"""Parameter-efficient fine-tuning: one front for the three methods, each in its own file.

    adapter     LLaMA-Adapter, gated attention over learned prompts     peft/adapter.py
    lora        LoRA, W + (alpha / r) B A on chosen projections          peft/lora.py
    bottleneck  Houlsby adapters after attention and feed-forward         peft/bottleneck.py

The front: ``PeftConfig`` (config.py) says which method and its sizes; ``apply_peft`` (apply.py)
composes the method into a model and freezes the base; ``save_peft`` / ``load_peft`` (save_load.py)
write and read adapter-only checkpoints; ``merge_lora`` (apply.py) folds a LoRA into the weights;
``export_lora_to_hf`` (export_hf.py) writes a LoRA in the Hugging Face PEFT layout; ``parameter_table``
and ``peft_stats`` (report.py) say what trains and how far it moved; visual.py holds the frozen image
encoders whose features the multimodal adapter reads.
"""

from .apply import apply_peft, merge_lora, peft_state_dict, remove_peft
from .config import LORA_TARGETS, METHODS, SCRIPT_FIELDS, PeftConfig
from .export_hf import export_lora_to_hf
from .report import parameter_table, peft_stats
from .save_load import PEFT_CONFIG, PEFT_WEIGHTS, load_peft, read_peft_meta, save_peft

__all__ = ["LORA_TARGETS", "METHODS", "PEFT_CONFIG", "PEFT_WEIGHTS", "SCRIPT_FIELDS", "PeftConfig",
           "apply_peft", "export_lora_to_hf", "load_peft", "merge_lora", "parameter_table", "peft_state_dict",
           "peft_stats", "read_peft_meta", "remove_peft", "save_peft"]
