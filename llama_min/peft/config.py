"""The configuration of a parameter-efficient fine-tuning method: which method, and its sizes.

Every field carries its help text, so that train.py makes one flag of each (training/config.py) and a
saved adapter records the whole configuration in ``peft.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from ..cli import flag
from ..config import dataclass_from_dict, short, type_problems

METHODS = ("adapter", "lora", "bottleneck")
# LoRA target -> the submodule of a Block that holds it ("output" is the model's own head).
LORA_TARGETS = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
                "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward", "output": None}
GROUP = "parameter-efficient fine-tuning (--method adapter|lora|bottleneck)"


@dataclass
class PeftConfig:
    method: str = flag("lora", "adapter (LLaMA-Adapter), lora (LoRA) or bottleneck (Houlsby adapters)",
                       group=GROUP)
    adapter_len: int = flag(10, "adapter: learned prompt vectors per adapted layer (the paper's K; 10 at 7B)",
                            group=GROUP)
    adapter_layers: int | None = flag(None, "adapter: how many of the top layers get prompts (the paper's L; "
                                      "30 of 32 at 7B); default: all", group=GROUP)
    gate_tanh: bool = flag(False, "adapter: scale the prompt attention by tanh(gate) as the official code does, "
                           "instead of by the gate itself as the paper's section 3.2 does", group=GROUP)
    visual_dim: int = flag(0, "adapter: width C_v of the image features its visual projection reads (M scales "
                           "concatenated; multimodal LLaMA-Adapter, section 4.3); 0: text only. train.py takes it "
                           "from --image_encoder", group=GROUP)
    visual_hidden: int = flag(0, "adapter: hidden width of the visual projection (Linear, SiLU, Linear, "
                              "LayerNorm); 0: one Linear, then LayerNorm", group=GROUP)
    image_encoder: str = flag("", "adapter: the frozen image encoder whose features the visual projection reads "
                              "(llama_min/peft/visual.py: lab, clip:DIR[:LAYERS], features:FILE); recorded so that "
                              "generation encodes images the same way; empty: the caller passes features itself",
                              group=GROUP)
    lora_rank: int = flag(8, "lora: rank r of the update B A", group=GROUP)
    lora_alpha: float = flag(16.0, "lora: the update is scaled by alpha / r", group=GROUP)
    lora_dropout: float = flag(0.05, "lora: dropout probability on the input of the low-rank path (training only)",
                               group=GROUP)
    lora_targets: tuple[str, ...] = flag(("wq", "wv"), "lora: projections to adapt, any of " + " ".join(LORA_TARGETS),
                                         group=GROUP, choices=list(LORA_TARGETS))
    bottleneck_dim: int = flag(32, "bottleneck: width of the down-projection of each adapter", group=GROUP)
    train_norms: bool = flag(False, "any method: also train the RMSNorm gains (e.g. LoRA plus trainable norms, or "
                             "bottleneck adapters as Houlsby et al. train the layer norms); train.py's --train_norms",
                             group=GROUP)

    def __post_init__(self):
        if isinstance(self.lora_targets, list):  # as JSON gives it
            self.lora_targets = tuple(self.lora_targets)
        problems = type_problems(self)  # first: the checks below compare numbers
        if problems:
            raise ValueError("invalid PeftConfig: " + "; ".join(problems))
        if self.method not in METHODS:
            problems.append(f"method must be one of {', '.join(METHODS)}, got {short(self.method)}")
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if unknown or not self.lora_targets:
            problems.append(f"lora_targets {short(list(self.lora_targets))} must be a non-empty subset of {list(LORA_TARGETS)}")
        for name in ("adapter_len", "lora_rank", "bottleneck_dim"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.visual_dim < 0 or self.visual_hidden < 0:
            problems.append(f"visual_dim and visual_hidden must be >= 0, got {self.visual_dim}, {self.visual_hidden}")
        if (self.visual_dim or self.visual_hidden or self.image_encoder) and self.method != "adapter":
            problems.append(f"visual_dim, visual_hidden and image_encoder belong to the multimodal adapter, not to "
                            f"method {self.method!r}")
        if (self.visual_hidden or self.image_encoder) and not self.visual_dim:
            problems.append("visual_hidden and image_encoder describe the visual projection, which a text-only adapter "
                            "(visual_dim 0) lacks")
        if self.adapter_layers is not None and self.adapter_layers < 1:
            problems.append(f"adapter_layers must be >= 1 or None (all layers), got {self.adapter_layers}")
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if problems:
            raise ValueError("invalid PeftConfig: " + "; ".join(problems))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PeftConfig":
        d = dict(d)
        if d.pop("bottleneck_train_norms", False):  # files written before train_norms served every method
            d["train_norms"] = True
        return dataclass_from_dict(cls, d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "PeftConfig":
        return cls.from_dict(json.loads(text))


def method_reading(field_name: str) -> str | None:
    """The method that reads the PeftConfig field of this name (its name says which: lora_rank is
    LoRA's); None for a field every method reads."""
    if field_name in ("gate_tanh", "visual_dim", "visual_hidden", "image_encoder"):
        return "adapter"
    return next((m for m in METHODS if field_name.startswith(m + "_")), None)


# Fields a script chooses with its own flags: ``--method`` (which also offers ``full``) and ``--train_norms``
# (which also serves ``--method partial``).
# train.py takes the visual width and the encoder from its own --image_encoder flag.
SCRIPT_FIELDS = ("method", "train_norms", "visual_dim", "image_encoder")
