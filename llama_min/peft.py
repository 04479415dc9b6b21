"""Parameter-efficient fine-tuning: one front for the three methods, each in its own file.

    adapter     LLaMA-Adapter, gated attention over learned prompts     llama_min/adapter.py
    lora        LoRA, W + (alpha / r) B A on chosen projections          llama_min/lora.py
    bottleneck  Houlsby adapters after attention and feed-forward         llama_min/bottleneck.py

``apply_peft(model, config)`` composes the method's modules into the model (into the hooks the core
leaves for them, or by replacing a projection with a LoRALinear holding the same weight: visible in
``print(model)``, no class is patched), freezes every base tensor and leaves only the new ones
trainable. Every new branch starts at zero, so the adapted model computes exactly what the base does.

An adapter checkpoint is a directory of two files, written atomically (it replaces DIR as a whole):

    DIR/peft.safetensors   only the trainable tensors, under their names in model.state_dict()
    DIR/peft.json          {"method", "config": PeftConfig, "base_checkpoint", "base_config"}

``load_peft`` is strict: a base with a different config, or a missing, unexpected or mis-shaped tensor,
is an error that names what is wrong.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .adapter import AdapterPrompt
from .bottleneck import Bottleneck
from .checkpoint import atomic_directory, check_state_dict
from .config import ModelConfig, dataclass_from_dict
from .lora import LoRALinear
from .model import Llama
from .rmsnorm import RMSNorm

METHODS = ("adapter", "lora", "bottleneck")
PEFT_WEIGHTS, PEFT_CONFIG = "peft.safetensors", "peft.json"
# LoRA target -> the submodule of a Block that holds it ("output" is the model's own head).
LORA_TARGETS = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
                "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward", "output": None}
# ModelConfig fields that change neither a tensor's shape nor what it means: a PEFT checkpoint may be
# loaded onto a base that differs in these.
_RUNTIME_FIELDS = ("attn_impl", "max_seq_len")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class PeftConfig:
    method: str = field(default="lora", metadata=_help(
        "adapter (LLaMA-Adapter), lora (LoRA) or bottleneck (Houlsby adapters)"))
    adapter_len: int = field(default=10, metadata=_help(
        "adapter: learned prompt vectors per adapted layer (the paper's K; 10 at 7B)"))
    adapter_layers: int | None = field(default=None, metadata=_help(
        "adapter: how many of the top layers get prompts (the paper's L; 30 of 32 at 7B); None = all"))
    gate_tanh: bool = field(default=False, metadata=_help(
        "adapter: scale the prompt attention by tanh(gate) as the official code does, instead of by "
        "the gate itself as the paper's section 3.2 does"))
    lora_rank: int = field(default=8, metadata=_help("lora: rank r of the update B A"))
    lora_alpha: float = field(default=16.0, metadata=_help("lora: the update is scaled by alpha / r"))
    lora_dropout: float = field(default=0.05, metadata=_help(
        "lora: dropout probability on the input of the low-rank path (training only)"))
    lora_targets: tuple[str, ...] = field(default=("wq", "wv"), metadata=_help(
        "lora: projections to adapt, any of " + " ".join(LORA_TARGETS)))
    bottleneck_dim: int = field(default=32, metadata=_help(
        "bottleneck: width of the down-projection of each adapter"))
    bottleneck_train_norms: bool = field(default=False, metadata=_help(
        "bottleneck: also train the RMSNorm gains, as Houlsby et al. train the layer norms"))
    train_norms: bool = field(default=False, metadata=_help(
        "any method: also train the RMSNorm gains (e.g. LoRA plus trainable norms); train.py's --train_norms"))

    def __post_init__(self):
        self.lora_targets = tuple(self.lora_targets)  # JSON gives a list
        problems = []
        if self.method not in METHODS:
            problems.append(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if unknown or not self.lora_targets:
            problems.append(f"lora_targets {list(self.lora_targets)} must be a non-empty subset of {list(LORA_TARGETS)}")
        for name in ("adapter_len", "lora_rank", "bottleneck_dim"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.adapter_layers is not None and self.adapter_layers < 1:
            problems.append(f"adapter_layers must be >= 1 or None (all layers), got {self.adapter_layers}")
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if problems:
            raise ValueError("invalid PeftConfig: " + "; ".join(problems))

    @property
    def trains_norms(self) -> bool:
        """Whether the RMSNorm gains train beside the method's own tensors."""
        return self.train_norms or self.method == "bottleneck" and self.bottleneck_train_norms

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PeftConfig":
        return dataclass_from_dict(cls, d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "PeftConfig":
        return cls.from_dict(json.loads(text))


# ---- command-line flags: one per PeftConfig field, with its help text ----------------------------

# Fields a script chooses with its own flags: ``--method`` (which also offers ``full``) and ``--train_norms``
# (which also serves ``--method partial``).
SCRIPT_FIELDS = ("method", "train_norms")


def add_peft_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--adapter_len``, ``--lora_rank``, ... (every field but the SCRIPT_FIELDS)."""
    group = parser.add_argument_group("parameter-efficient fine-tuning (--method adapter|lora|bottleneck)")
    for f in fields(PeftConfig):
        if f.name in SCRIPT_FIELDS:
            continue
        if isinstance(f.default, bool):
            group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                               help=f.metadata["help"])
        elif f.name == "lora_targets":
            group.add_argument(f"--{f.name}", nargs="+", default=list(f.default), choices=list(LORA_TARGETS),
                               help=f.metadata["help"])
        else:
            kind = {"adapter_layers": int}.get(f.name, type(f.default))
            group.add_argument(f"--{f.name}", type=kind, default=f.default,
                               help=f"{f.metadata['help']} (default: {f.default})")


def peft_config_from_args(args: argparse.Namespace, method: str, train_norms: bool = False) -> PeftConfig:
    return PeftConfig(method=method, train_norms=train_norms,
                      **{f.name: getattr(args, f.name) for f in fields(PeftConfig) if f.name not in SCRIPT_FIELDS})


# ---- composing the modules into a model -----------------------------------------------------------

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
    if getattr(model, "peft_config", None) is not None:
        raise ValueError(f"the model already has {model.peft_config.method} applied; call remove_peft(model) first")
    mc: ModelConfig = model.config
    n_adapted = mc.n_layers if config.adapter_layers is None else config.adapter_layers
    if config.method == "adapter" and n_adapted > mc.n_layers:
        raise ValueError(f"adapter_layers {n_adapted} exceeds the model's {mc.n_layers} layers; "
                         f"choose at most {mc.n_layers}")
    model.requires_grad_(False)
    weight = model.tok_embeddings.weight
    factory = dict(device=weight.device, dtype=weight.dtype)
    if config.method == "adapter":
        for layer in model.layers[mc.n_layers - n_adapted:]:  # the top L layers (section 3.1)
            layer.attention.prompt_adapter = AdapterPrompt(config.adapter_len, mc.dim, mc.n_heads,
                                                           mc.n_kv_heads, config.gate_tanh, **factory)
    elif config.method == "lora":
        for parent, name in _lora_sites(model, config.lora_targets):
            setattr(parent, name, LoRALinear(getattr(parent, name), config.lora_rank, config.lora_alpha,
                                             config.lora_dropout))
    else:
        for layer in model.layers:
            layer.attention_adapter = Bottleneck(mc.dim, config.bottleneck_dim, **factory)
            layer.ffn_adapter = Bottleneck(mc.dim, config.bottleneck_dim, **factory)
    if config.trains_norms:
        # Kept so that remove_peft can give the base its own gains back.
        model.peft_base_norms = {n: p.detach().clone() for n, p in model.named_parameters()
                                 if n.endswith("norm.weight")}
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.weight.requires_grad_(True)
    model.peft_config = config
    return model


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
        unmerge_lora(model)
        _unwrap_lora(model)
    for layer in model.layers:
        layer.attention.prompt_adapter = layer.attention_adapter = layer.ffn_adapter = None
    base_norms = getattr(model, "peft_base_norms", None)
    if base_norms is not None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in base_norms.items():
                params[name].copy_(value)
        del model.peft_base_norms
    del model.peft_config
    return model.requires_grad_(True)


def _peft_config(model: Llama) -> PeftConfig:
    config = getattr(model, "peft_config", None)
    if config is None:
        raise ValueError("this model has no PEFT modules: call apply_peft(model, config) or load_peft(model, dir) first")
    return config


# ---- LoRA merging ---------------------------------------------------------------------------------

def _lora_modules(model: Llama) -> list[LoRALinear]:
    if _peft_config(model).method != "lora":
        raise ValueError(f"merging applies to LoRA only; this model has {model.peft_config.method}")
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model: Llama) -> Llama:
    """Fold (alpha / r) B A into every adapted W, for inference at the base model's cost. Idempotent."""
    modules = _lora_modules(model)
    if model.config.tie_embeddings and "output" in model.peft_config.lora_targets:
        raise ValueError("cannot merge LoRA into a tied output head: the update would change the token "
                         "embedding too; leave it unmerged, or do not target 'output' on tied models")
    for m in modules:
        m.merge()
    return model


def unmerge_lora(model: Llama) -> Llama:
    """Subtract (alpha / r) B A from every adapted W again. Idempotent."""
    for m in _lora_modules(model):
        m.unmerge()
    return model


def fold_lora(model: Llama) -> Llama:
    """Merge LoRA and drop its modules for good: a plain Llama whose weights include the update, ready
    for ``save_checkpoint`` (the ``--merge`` path writes a full checkpoint this way)."""
    merge_lora(model)
    _unwrap_lora(model)
    del model.peft_config
    return model.requires_grad_(True)


# ---- adapter-only checkpoints ---------------------------------------------------------------------

def peft_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    """The tensors apply_peft made trainable (detached), under their names in model.state_dict()."""
    _peft_config(model)
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def save_peft(model: Llama, directory: str | Path, base_checkpoint: str | Path | None = None) -> None:
    """Write DIR/peft.safetensors and DIR/peft.json (replacing DIR atomically). ``base_checkpoint`` is
    recorded so that the adapter can be found with the base it was trained on."""
    config = _peft_config(model)
    meta = {"method": config.method, "config": config.to_dict(),
            "base_checkpoint": None if base_checkpoint is None else str(base_checkpoint),
            "base_config": model.config.to_dict()}
    tensors = {k: v.contiguous().cpu() for k, v in peft_state_dict(model).items()}
    with atomic_directory(directory) as tmp:
        save_file(tensors, tmp / PEFT_WEIGHTS, metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def read_peft_meta(directory: str | Path) -> dict:
    """peft.json of an adapter checkpoint (method, config, base_checkpoint, base_config)."""
    directory = Path(directory)
    for name in (PEFT_CONFIG, PEFT_WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a PEFT checkpoint: no {name} in it "
                                    f"(expected {PEFT_WEIGHTS} + {PEFT_CONFIG}, as written by save_peft)")
    meta = json.loads((directory / PEFT_CONFIG).read_text())
    missing = [k for k in ("method", "config", "base_checkpoint", "base_config") if k not in meta]
    if missing:
        raise ValueError(f"{directory / PEFT_CONFIG} lacks the fields {missing}; was it written by save_peft?")
    return meta


def _check_base(model_config: ModelConfig, meta: dict, directory: Path) -> None:
    ours, theirs = model_config.to_dict(), meta["base_config"]
    diffs = [f"{k}: {ours.get(k)!r} here, {theirs.get(k)!r} there" for k in sorted(set(ours) | set(theirs))
             if k not in _RUNTIME_FIELDS and ours.get(k) != theirs.get(k)]
    if diffs:
        raise ValueError(f"the PEFT checkpoint {directory} was trained on a base model with a different config "
                         f"({'; '.join(diffs)}); load it onto that base (recorded base checkpoint: "
                         f"{meta.get('base_checkpoint')})")


def load_peft(model: Llama, directory: str | Path) -> Llama:
    """Apply the adapter stored in DIR to ``model`` and load its tensors, strictly. A model that already
    carries an adapter gets it swapped: the old modules are removed first, so each adapter gives its
    own outputs on the same base."""
    directory = Path(directory)
    meta = read_peft_meta(directory)
    config = PeftConfig.from_dict(meta["config"])
    _check_base(model.config, meta, directory)
    state = load_file(directory / PEFT_WEIGHTS)
    if getattr(model, "peft_config", None) is not None:
        remove_peft(model)
    apply_peft(model, config)
    expected = peft_state_dict(model)
    check_state_dict({k: v.shape for k, v in expected.items()}, state, f"{directory / PEFT_WEIGHTS} ({config.method})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
    return model


# ---- what is trained ------------------------------------------------------------------------------

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
