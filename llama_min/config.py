"""Model configuration: the numbers that define a LLaMA, named as in Meta's ``params.json``.

Every size the model uses is derived here, once, from these fields: no number hides in a class
default that happens to fit one model. The presets carry the published hyper-parameters of LLaMA (Touvron et al. 2023,
Table 2) and Llama 2 (Touvron et al. 2023b, Table 1 and the released ``params.json`` files).
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path


def short(value, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters: a message quoting a file's value stays one short line
    even when the file holds a megabyte there."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def dataclass_from_dict(cls, d: dict):
    """Build a config dataclass from a dict (a JSON file), naming any key it does not know rather than
    failing on it with Python's generic TypeError."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object of {cls.__name__} fields, found {type(d).__name__} {short(d)}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {short(unknown, 120)}; known fields: {sorted(known)}")
    return cls(**d)


def type_problems(obj) -> list[str]:
    """Every field of the dataclass ``obj`` whose value is not of its declared type, as "name must be T,
    got V": a JSON file can hold "64" or 64.5 where an integer belongs, and nothing else would notice
    before some arithmetic fails far away."""
    hints = typing.get_type_hints(type(obj))
    return [f"{f.name} must be {_type_name(hints[f.name])}, got {short(getattr(obj, f.name))}"
            for f in fields(obj) if not _is_a(getattr(obj, f.name), hints[f.name])]


def _is_a(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_a(value, a) for a in typing.get_args(annotation))
    if origin in (tuple, list):
        return isinstance(value, (tuple, list)) and all(_is_a(v, typing.get_args(annotation)[0]) for v in value)
    if annotation is type(None):
        return value is None
    if isinstance(value, bool):  # a bool is an int to Python, never to a config
        return annotation is bool
    if annotation is float:
        return isinstance(value, (int, float))
    return isinstance(value, annotation)


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin in (tuple, list):
        return f"a list of {_type_name(typing.get_args(annotation)[0])}"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


@dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling, for contexts longer than the one a model was pretrained on (rope.py
    applies it; the formulas and their sources are there).

    kind "linear":  every frequency divided by ``factor`` (position interpolation).
    kind "llama3":  Llama 3.1's rule: frequencies whose wavelength exceeds original_max_seq_len /
                    low_freq_factor are divided by ``factor``, those shorter than original_max_seq_len /
                    high_freq_factor are kept, and those between are blended smoothly.
    """
    kind: str
    factor: float
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_seq_len: int = 8192  # llama3 only: the pretraining context

    def __post_init__(self):
        if type_problems(self):
            raise ValueError(f"rope scaling: {'; '.join(type_problems(self))}")
        if self.kind not in ("linear", "llama3"):
            raise ValueError(f"rope scaling kind {self.kind!r}: expected 'linear' or 'llama3'")
        if not self.factor >= 1 or (self.kind == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor):
            raise ValueError(f"rope scaling {self}: expected factor >= 1 and 0 < low_freq_factor < high_freq_factor")


@dataclass(frozen=True)
class Quantization:
    """Weight-only quantisation of a checkpoint's linear layers (llama_min/quantize.py has the formulas).

    kind "int8":  one scale per output channel.
    kind "int4":  4-bit codes with a scale and zero point per group of ``group_size`` inputs (32, 64, 128
                  or 256: the sizes PyTorch's 4-bit kernel takes; smaller groups are more accurate).
    """
    kind: str
    group_size: int | None = None  # int4 only

    def __post_init__(self):
        if self.kind not in ("int8", "int4"):
            raise ValueError(f"quantization kind {self.kind!r}: expected 'int8' or 'int4'")
        if self.kind == "int4" and self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size {self.group_size}: expected one of {', '.join(map(str, INT4_GROUP_SIZES))}")
        if self.kind == "int8" and self.group_size is not None:
            raise ValueError("int8 quantisation has one scale per output channel: no group size")


INT4_GROUP_SIZES = (32, 64, 128, 256)


def llama_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """LLaMA's SwiGLU hidden size (Shazeer 2020; LLaMA paper section 2.2).

    Two thirds of the usual 4·dim keeps the parameter count of a plain MLP, since SwiGLU has three
    matrices instead of two; then the optional multiplier, then round up to ``multiple_of``.
    4096 gives 11008 for LLaMA-7B.
    """
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


ATTN_IMPLS = ("sdpa", "plain")  # attention.py: the fused kernel, or scores, mask and softmax written out


@dataclass
class ModelConfig:
    dim: int = 4096  # width of the residual stream
    n_layers: int = 32  # transformer blocks
    n_heads: int = 32  # query heads
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); None means n_heads
    vocab_size: int = 32000
    multiple_of: int = 256  # llama_hidden_dim rounds the SwiGLU hidden size up to a multiple of this
    ffn_dim_multiplier: float | None = None  # optional factor in llama_hidden_dim (Llama 2 70B: 1.3)
    norm_eps: float = 1e-5  # RMSNorm epsilon: 1e-6 in LLaMA-1, 1e-5 in Llama 2
    rope_theta: float = 10000.0  # RoPE base (Su et al. 2021, eq. 15)
    rope_scaling: RopeScaling | None = None  # frequency scaling of long-context models (Llama 3.1+)
    max_seq_len: int = 2048  # longest sequence the model takes (and its KV cache covers)
    tie_embeddings: bool = False  # share the token embedding with the output head
    # SwiGLU hidden size. None means LLaMA's rule, llama_hidden_dim(dim, multiple_of, ffn_dim_multiplier),
    # resolved on construction: afterwards it is always the size the model uses. Converted models give it
    # explicitly (Hugging Face's intermediate_size, GGUF's feed_forward_length).
    hidden_dim: int | None = None
    # How attention is computed, not what the model is: "sdpa" (fused kernel) or "plain" (scores, mask,
    # softmax written out). A runtime choice, so never written to config.json (to_dict).
    attn_impl: str = "sdpa"
    quantization: Quantization | None = None  # how a quantised checkpoint stores its linear layers (quantize.py)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if isinstance(self.rope_scaling, dict):  # as config.json stores it
            self.rope_scaling = dataclass_from_dict(RopeScaling, self.rope_scaling)
        if isinstance(self.quantization, dict):
            self.quantization = dataclass_from_dict(Quantization, self.quantization)
        # Types and ranges first: every size below divides or multiplies by these.
        problems = type_problems(self)
        if not problems:
            problems = [f"{name} must be at least 1, got {getattr(self, name)}" for name in
                        ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len",
                         "hidden_dim") if getattr(self, name) is not None and getattr(self, name) < 1]
            problems += [f"{name} must be a positive finite number, got {getattr(self, name)}" for name in
                         ("norm_eps", "rope_theta", "ffn_dim_multiplier")
                         if getattr(self, name) is not None and not 0 < getattr(self, name) < math.inf]
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))
        if self.hidden_dim is None:
            self.hidden_dim = llama_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        if self.dim % self.n_heads:
            problems.append(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        elif self.head_dim % 2:
            problems.append(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.attn_impl not in ATTN_IMPLS:
            problems.append(f"attn_impl must be 'sdpa' or 'plain', got {short(self.attn_impl)}")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    # ---- construction and serialisation -------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        """The preset's fields with ``overrides`` on top, built afresh: --dim 128 gives the hidden size
        of dim 128, unless hidden_dim is overridden too."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**(PRESETS[name] | overrides))

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return dataclass_from_dict(cls, d)

    @classmethod
    def from_params_json(cls, path: str | Path, **overrides) -> "ModelConfig":
        """Read Meta's ``params.json``. Its ``vocab_size`` is -1 in LLaMA-1 releases (the tokenizer
        decides); pass ``vocab_size=`` then. Keys this model does not use are rejected by name."""
        params = json.loads(Path(path).read_text())
        params.update(overrides)
        # Llama 3.1+: "use_scaled_rope" with Meta's frequency rule, factor 8 unless "rope_scaling_factor"
        # says otherwise (Llama 3.2's small models use 32); the other constants of the rule are fixed there.
        if params.pop("use_scaled_rope", False):
            params["rope_scaling"] = RopeScaling("llama3", float(params.pop("rope_scaling_factor", None) or 8.0))
        params.pop("rope_scaling_factor", None)
        if type(params.get("vocab_size")) is not int or params["vocab_size"] <= 0:
            raise ValueError(f"{path} has no vocab_size (it is {short(params.get('vocab_size'))}); "
                             "pass vocab_size= from the tokenizer")
        params.setdefault("max_seq_len", 2048)
        return cls.from_dict(params)

    def to_dict(self) -> dict:
        """The fields that describe the model (config.json): all but attn_impl (older files hold it, and
        still load)."""
        d = asdict(self)
        del d["attn_impl"]
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


_LLAMA1 = dict(vocab_size=32000, multiple_of=256, norm_eps=1e-6, max_seq_len=2048)
_LLAMA2 = dict(vocab_size=32000, multiple_of=256, norm_eps=1e-5, max_seq_len=4096)

# Keyword arguments of ModelConfig rather than configs, so that an override of dim (from_preset) cannot
# keep a hidden size resolved for another width.
PRESETS: dict[str, dict] = {
    # A CPU-lab size: `python train.py` trains it in minutes on a laptop-class CPU and it learns
    # Shakespeare's spelling and rhythm. At that budget a small model seeing more tokens beats a larger
    # one seeing fewer (docs/results.md, "How the default got there"). Small vocabulary to match a
    # tokenizer trained on ~5 MB.
    "tiny": dict(dim=96, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=2048, multiple_of=32, norm_eps=1e-5,
                 max_seq_len=256),
    "llama-7b": dict(dim=4096, n_layers=32, n_heads=32, **_LLAMA1),
    "llama-13b": dict(dim=5120, n_layers=40, n_heads=40, **_LLAMA1),
    "llama-30b": dict(dim=6656, n_layers=60, n_heads=52, **_LLAMA1),
    "llama-65b": dict(dim=8192, n_layers=80, n_heads=64, **_LLAMA1),
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, **_LLAMA2),
    "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40, **_LLAMA2),
    "llama2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                       **{**_LLAMA2, "multiple_of": 4096}),
}
