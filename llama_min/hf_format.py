"""The Hugging Face ``LlamaForCausalLM`` layout: its config keys and tensor names, mapped to ours.

This is the one place that knows the Hugging Face names and the one place that applies the q/k row
permutation; the parity test, weights_convert.py and the LoRA export all go through it.

Why a permutation: Meta's rotary code rotates adjacent features (2i, 2i+1) of each head; Hugging Face's
rotates feature i with feature i + d/2 ("rotate_half"). The two give the same attention scores if the
rows of wq and wk are reordered inside every head so that Meta's pair (2i, 2i+1) lands on Hugging Face's
pair (i, i + d/2). wk has n_kv_heads heads, so its rows are permuted with n_kv_heads, not n_heads.
"""

from __future__ import annotations

import re

import torch

from .config import ModelConfig, RopeScaling, short

# Our name (with {i} for the layer) -> Hugging Face name. Every tensor of both layouts appears here.
NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Buffers some Hugging Face files carry that are derived from the config, not learned: dropped.
DERIVED_HF_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


_OURS_TO_HF = [(_pattern(ours), hf) for ours, hf in NAMES.items()]
_HF_TO_OURS = [(_pattern(hf), ours) for ours, hf in NAMES.items()]


def _rename(name: str, table: list, direction: str) -> str:
    for pattern, template in table:
        m = pattern.match(name)
        if m:
            return template.format(i=m.group(1)) if m.groups() else template
    raise KeyError(f"unknown tensor name {name!r} ({direction}); the known names are: {', '.join(NAMES)}")


def permute_rope_rows(w: torch.Tensor, n_heads: int, to_hf: bool) -> torch.Tensor:
    """Reorder the rows of a q or k projection (out_features, in) inside each head between Meta's
    interleaved pairs and Hugging Face's halves. Works for any matrix whose rows are head features
    (a LoRA B matrix too). ``to_hf=False`` is the inverse of ``to_hf=True``."""
    rows, cols = w.shape
    d = rows // n_heads
    if to_hf:  # row 2i+j of a head (pair i, member j) moves to row j·d/2 + i
        return w.reshape(n_heads, d // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
    return w.reshape(n_heads, 2, d // 2, cols).transpose(1, 2).reshape(rows, cols)


def _rope_heads(name: str, config: ModelConfig) -> int | None:
    if name.endswith("attention.wq.weight"):
        return config.n_heads
    if name.endswith("attention.wk.weight"):
        return config.n_kv_heads
    return None


def tensor_from_hf(hf_name: str, tensor: torch.Tensor, config: ModelConfig) -> tuple[str, torch.Tensor]:
    """One Hugging Face tensor -> (our name, tensor in our layout)."""
    name = _rename(hf_name, _HF_TO_OURS, "Hugging Face -> llama_min")
    heads = _rope_heads(name, config)
    return name, tensor if heads is None else permute_rope_rows(tensor, heads, to_hf=False)


def tensor_to_hf(name: str, tensor: torch.Tensor, config: ModelConfig) -> tuple[str, torch.Tensor]:
    """One of our tensors -> (Hugging Face name, tensor in Hugging Face's layout)."""
    heads = _rope_heads(name, config)
    return (_rename(name, _OURS_TO_HF, "llama_min -> Hugging Face"),
            tensor if heads is None else permute_rope_rows(tensor, heads, to_hf=True))


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """A whole Hugging Face state dict -> ours (a tied lm_head, when present, is dropped)."""
    out = dict(tensor_from_hf(k, v, config) for k, v in hf_state.items() if not DERIVED_HF_TENSORS.match(k))
    if config.tie_embeddings:
        out.pop("output.weight", None)
    return out


def state_dict_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    return dict(tensor_to_hf(k, v, config) for k, v in state.items())


# ---- config ---------------------------------------------------------------------------------------

def rope_from_hf(hf: dict) -> tuple[float, RopeScaling | None]:
    """RoPE's base and scaling from a Hugging Face config.json. Newer files keep both in
    ``rope_parameters``, older ones in ``rope_theta`` and ``rope_scaling``; some carry both, and then the
    scaling is wherever its kind is not "default" (two different kinds are a contradiction)."""
    sources = [d for d in (hf.get("rope_parameters"), hf.get("rope_scaling")) if d]
    kind_of = lambda d: d.get("rope_type", d.get("type", "default"))  # noqa: E731
    kinds = {kind_of(d) for d in sources} - {"default"}
    if len(kinds) > 1:
        raise ValueError(f"rope_parameters and rope_scaling disagree on the rope scaling: {sorted(kinds)}")
    theta = next((d["rope_theta"] for d in sources if "rope_theta" in d), hf.get("rope_theta", 10000.0))
    scaled = next((d for d in sources if kind_of(d) != "default"), None)
    if scaled is None:
        return theta, None
    kind = kind_of(scaled)
    if kind == "linear":
        return theta, RopeScaling("linear", float(scaled["factor"]))
    if kind == "llama3":
        return theta, RopeScaling("llama3", float(scaled["factor"]), float(scaled["low_freq_factor"]),
                                  float(scaled["high_freq_factor"]), int(scaled["original_max_position_embeddings"]))
    raise ValueError(f"rope scaling of type {kind!r} (llama_min implements linear and llama3)")


def rope_to_hf(config: ModelConfig) -> dict:
    """``rope_parameters`` for config.json (read by transformers 5; rope_theta is also written top-level)."""
    s = config.rope_scaling
    if s is None:
        return {"rope_type": "default", "rope_theta": config.rope_theta}
    if s.kind == "linear":
        return {"rope_type": "linear", "factor": s.factor, "rope_theta": config.rope_theta}
    return {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_seq_len,
            "rope_theta": config.rope_theta}


# The sizes a LlamaConfig gives as integers (a file with "64" or 0 there is refused naming the key).
HF_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
            "intermediate_size", "max_position_embeddings")


def config_from_hf(hf: dict, max_seq_len: int | None = None) -> ModelConfig:
    """A Hugging Face LlamaConfig (as a dict from config.json) -> ModelConfig. Features this model does
    not implement are refused by name rather than silently ignored."""
    bad = [f"{k} must be a positive integer, got {short(hf[k])}" for k in HF_SIZES
           if hf.get(k) is not None and (type(hf[k]) is not int or hf[k] < 1)]
    bad += [f"{k} must be a positive number, got {short(hf[k])}" for k in ("rms_norm_eps", "rope_theta")
            if k in hf and (type(hf[k]) not in (int, float) or not hf[k] > 0)]
    bad += [f"{k} must be a JSON object, got {short(hf[k])}" for k in ("rope_parameters", "rope_scaling")
            if hf.get(k) is not None and not isinstance(hf[k], dict)]
    if bad:
        raise ValueError("; ".join(bad))
    unsupported = []
    if hf.get("model_type", "llama") != "llama":
        unsupported.append(f"model_type {hf['model_type']!r} (only 'llama')")
    try:
        rope_theta, rope_scaling = rope_from_hf(hf)
    except ValueError as e:
        unsupported.append(str(e))
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        unsupported.append("attention or MLP biases")
    if hf.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act {hf['hidden_act']!r}")
    n_heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // n_heads):
        unsupported.append(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    if unsupported:
        raise ValueError("this Hugging Face model uses features llama_min does not implement: " + "; ".join(unsupported))
    return ModelConfig(
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        vocab_size=hf["vocab_size"],
        hidden_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_seq_len=max_seq_len or hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def config_to_hf(config: ModelConfig, bos_id: int = 1, eos_id: int = 2) -> dict:
    """ModelConfig -> a config.json that ``transformers`` loads as LlamaForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "intermediate_size": config.hidden_dim,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": rope_to_hf(config),
        "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }
