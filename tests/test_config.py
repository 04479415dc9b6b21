"""ModelConfig: the SwiGLU hidden-size rule, presets, Meta's params.json, and clear errors."""

import json

import pytest

from llama_min import ModelConfig
from llama_min.config import PRESETS
from llama_min.training.config import parse_args


def rounded_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def swiglu_width(dim: int, multiple_of: int, multiplier: float | None = None) -> int:
    """LLaMA's rule written a second way, in integers where it can be (Meta's model.py FeedForward)."""
    hidden = 8 * dim // 3
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return rounded_up(hidden, multiple_of)


# Published hidden sizes of LLaMA-1 7B/13B/30B/65B and Llama 2 70B (from the released checkpoints'
# w1 shapes), with the multiple_of and ffn_dim_multiplier of their params.json files.
@pytest.mark.parametrize("dim, multiple_of, multiplier, expected", [
    (4096, 256, None, 11008),
    (5120, 256, None, 13824),
    (6656, 256, None, 17920),
    (8192, 256, None, 22016),
    (8192, 4096, 1.3, 28672),
])
def test_swiglu_hidden_size(dim, multiple_of, multiplier, expected):
    config = ModelConfig(dim=dim, n_heads=dim // 128, multiple_of=multiple_of, ffn_dim_multiplier=multiplier)
    assert config.hidden_dim == expected, (
        f"dim {dim}, multiple_of {multiple_of}, multiplier {multiplier}: SwiGLU hidden size is "
        f"{config.hidden_dim}, expected {expected} (int(2*4*dim/3), times the multiplier, "
        f"rounded up to multiple_of)")


# The w1 widths of the released checkpoints each preset describes; tiny's is the rule's (96 -> 256).
PRESET_WIDTHS = {"tiny": 256, "llama-7b": 11008, "llama-13b": 13824, "llama-30b": 17920, "llama-65b": 22016,
                 "llama2-7b": 11008, "llama2-13b": 13824, "llama2-70b": 28672}


def test_every_preset_resolves_the_published_width():
    assert set(PRESET_WIDTHS) == set(PRESETS), f"PRESET_WIDTHS lists {sorted(PRESET_WIDTHS)}, presets are {sorted(PRESETS)}"
    for name, width in PRESET_WIDTHS.items():
        config, args = ModelConfig.from_preset(name), PRESETS[name]
        rule = swiglu_width(args["dim"], args["multiple_of"], args.get("ffn_dim_multiplier"))
        assert config.hidden_dim == rule == width, \
            f"{name}: hidden_dim {config.hidden_dim}, the rule gives {rule}, the released model has {width}"


def test_explicit_hidden_dim_overrides_the_rule():
    config = ModelConfig(dim=64, n_heads=4, hidden_dim=100)
    assert config.hidden_dim == 100, f"hidden_dim=100 given, hidden_dim is {config.hidden_dim}"


@pytest.mark.parametrize("overrides", [dict(dim=128), dict(dim=128, multiple_of=64), dict(ffn_dim_multiplier=1.5),
                                       dict(dim=128, hidden_dim=200)])
def test_preset_overrides_derive_the_width_afresh(overrides):
    """An override of dim, multiple_of or ffn_dim_multiplier changes the width the rule gives, unless
    hidden_dim is given too (train.py's --dim 128 must not keep tiny's 256)."""
    args = PRESETS["tiny"] | overrides
    expected = overrides.get("hidden_dim") or swiglu_width(args["dim"], args["multiple_of"], args.get("ffn_dim_multiplier"))
    config = ModelConfig.from_preset("tiny", **overrides)
    assert config.hidden_dim == expected, f"tiny with {overrides}: hidden_dim {config.hidden_dim}, expected {expected}"


@pytest.mark.parametrize("flags, expected", [(["--dim", "128"], swiglu_width(128, 32)),
                                             (["--dim", "128", "--hidden_dim", "200"], 200)])
def test_train_flags_override_the_width(flags, expected):
    cfg, _ = parse_args(flags)
    config = ModelConfig.from_preset(cfg.model, **cfg.model_overrides)
    assert config.hidden_dim == expected, f"train.py {' '.join(flags)}: hidden_dim {config.hidden_dim}, expected {expected}"


@pytest.mark.parametrize("stored", [None, "absent"])
def test_config_json_without_a_resolved_width_loads_the_same_model(tmp_path, stored):
    """config.json files written before hidden_dim was resolved hold null there, or nothing."""
    config = ModelConfig.from_preset("llama2-70b")
    old = config.to_dict()
    if stored is None:
        old["hidden_dim"] = None
    else:
        del old["hidden_dim"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    loaded = ModelConfig.load(tmp_path / "config.json")
    assert loaded == config and loaded.hidden_dim == 28672, f"old config.json ({stored}) read as {loaded}"


def test_n_kv_heads_defaults_to_n_heads():
    config = ModelConfig(dim=64, n_heads=4)
    assert config.n_kv_heads == 4, f"n_kv_heads=None should mean n_heads (4), got {config.n_kv_heads}"
    assert config.head_dim == 16, f"head_dim should be dim / n_heads = 16, got {config.head_dim}"


@pytest.mark.parametrize("name, n_kv_heads, norm_eps, max_seq_len", [
    ("llama-7b", 32, 1e-6, 2048), ("llama-65b", 64, 1e-6, 2048),
    ("llama2-7b", 32, 1e-5, 4096), ("llama2-70b", 8, 1e-5, 4096),
])
def test_presets_carry_family_settings(name, n_kv_heads, norm_eps, max_seq_len):
    c = ModelConfig.from_preset(name)
    got = (c.n_kv_heads, c.norm_eps, c.max_seq_len, c.vocab_size, c.rope_theta)
    want = (n_kv_heads, norm_eps, max_seq_len, 32000, 10000.0)
    assert got == want, f"{name}: (n_kv_heads, norm_eps, max_seq_len, vocab_size, rope_theta) = {got}, expected {want}"


def test_every_issue_preset_exists():
    expected = {"tiny", "llama-7b", "llama-13b", "llama-30b", "llama-65b", "llama2-7b", "llama2-13b", "llama2-70b"}
    missing = expected - set(PRESETS)
    assert not missing, f"presets missing: {sorted(missing)}"


def test_from_preset_applies_overrides_without_changing_the_preset():
    before = PRESETS["tiny"]["max_seq_len"]
    c = ModelConfig.from_preset("tiny", max_seq_len=before + 1)
    assert c.max_seq_len == before + 1, f"override max_seq_len={before + 1} ignored: got {c.max_seq_len}"
    assert PRESETS["tiny"]["max_seq_len"] == before, "from_preset(..., max_seq_len=...) modified the shared preset"


def test_unknown_preset_is_named_with_the_choices():
    with pytest.raises(ValueError) as err:
        ModelConfig.from_preset("llama-8b")
    message = str(err.value)
    assert "llama-8b" in message and "llama-7b" in message, \
        f"the error should name the unknown preset and list the known ones; got: {message}"


def _write_params(tmp_path, params: dict):
    path = tmp_path / "params.json"
    path.write_text(json.dumps(params))
    return path


# Meta's released params.json files (Llama 2 7B and 70B), as shipped: vocab_size is -1.
LLAMA2_7B_PARAMS = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
                    "vocab_size": -1}
LLAMA2_70B_PARAMS = {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64,
                     "n_kv_heads": 8, "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}


@pytest.mark.parametrize("params, preset", [(LLAMA2_7B_PARAMS, "llama2-7b"), (LLAMA2_70B_PARAMS, "llama2-70b")])
def test_from_params_json_matches_preset(tmp_path, params, preset):
    path = _write_params(tmp_path, params)
    config = ModelConfig.from_params_json(path, vocab_size=32000, max_seq_len=4096)
    expected = ModelConfig.from_preset(preset)
    assert config == expected, f"params.json of {preset} read as\n{config}\nexpected the preset\n{expected}"


def test_from_params_json_without_vocab_size_says_what_to_pass(tmp_path):
    path = _write_params(tmp_path, LLAMA2_7B_PARAMS)
    with pytest.raises(ValueError, match="vocab_size") as err:
        ModelConfig.from_params_json(path)
    assert str(path) in str(err.value), f"the error should name the file; got: {err.value}"


def test_from_params_json_rejects_unknown_keys_by_name(tmp_path):
    path = _write_params(tmp_path, {**LLAMA2_7B_PARAMS, "vocab_size": 32000, "moe_num_experts": 8})
    with pytest.raises(ValueError) as err:
        ModelConfig.from_params_json(path)
    assert "moe_num_experts" in str(err.value), f"the error should name the unknown key; got: {err.value}"


def test_from_dict_rejects_unknown_field_by_name():
    with pytest.raises(ValueError) as err:
        ModelConfig.from_dict({"dim": 64, "n_heads": 4, "n_head": 4})
    assert "n_head" in str(err.value) and "n_heads" in str(err.value), \
        f"the error should name the unknown field and list the known ones; got: {err.value}"


@pytest.mark.parametrize("fields, words", [
    (dict(dim=65, n_heads=4), ["dim", "n_heads"]),
    (dict(dim=64, n_heads=4, n_kv_heads=3), ["n_kv_heads"]),
    (dict(dim=60, n_heads=4), ["head_dim"]),
    (dict(dim=64, n_heads=4, attn_impl="flash"), ["attn_impl", "flash"]),
])
def test_inconsistent_config_is_refused_with_a_reason(fields, words):
    with pytest.raises(ValueError) as err:
        ModelConfig(**fields)
    missing = [w for w in words if w not in str(err.value)]
    assert not missing, f"ModelConfig({fields}) error should mention {missing}; got: {err.value}"


def test_save_load_round_trip(tmp_path):
    config = ModelConfig.from_preset("llama2-70b", tie_embeddings=True, rope_theta=500000.0)
    config.save(tmp_path / "config.json")
    loaded = ModelConfig.load(tmp_path / "config.json")
    assert loaded == config, f"config changed through save/load:\n{config}\n->\n{loaded}"
