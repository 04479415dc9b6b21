"""ModelConfig: the SwiGLU hidden-size rule, presets, Meta's params.json, and clear errors."""

import json

import pytest

from llama_min import ModelConfig
from llama_min.config import PRESETS


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
    assert config.ffn_hidden_dim == expected, (
        f"dim {dim}, multiple_of {multiple_of}, multiplier {multiplier}: SwiGLU hidden size is "
        f"{config.ffn_hidden_dim}, expected {expected} (int(2*4*dim/3), times the multiplier, "
        f"rounded up to multiple_of)")


def test_explicit_hidden_dim_overrides_the_rule():
    config = ModelConfig(dim=64, n_heads=4, hidden_dim=100)
    assert config.ffn_hidden_dim == 100, f"hidden_dim=100 given, ffn_hidden_dim is {config.ffn_hidden_dim}"


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
    before = PRESETS["tiny"].max_seq_len
    c = ModelConfig.from_preset("tiny", max_seq_len=before + 1)
    assert c.max_seq_len == before + 1, f"override max_seq_len={before + 1} ignored: got {c.max_seq_len}"
    assert PRESETS["tiny"].max_seq_len == before, "from_preset(..., max_seq_len=...) modified the shared preset"


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
    assert config.ffn_hidden_dim == expected.ffn_hidden_dim


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
