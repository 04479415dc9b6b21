"""Parity with an independent implementation: Hugging Face transformers' LlamaForCausalLM.

The stored fixture (tests/fixtures/hf_tiny_llama, written by make_hf_reference.py) holds a random HF
model with 4 query heads, 2 kv heads, rope_theta 50000, rms_norm_eps 0.01, and its float32 logits for
a fixed input. These tests need no transformers: they read HF's config.json and weights, map them with
llama_min.hf_format, and compare logits. Deliberately wrong mappings must fail the same comparison,
which shows the fixture is sensitive to each mistake. When transformers is installed, further tests
compare against a fresh HF model built in-process, in both directions of the mapping.
"""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama_min import Llama, ModelConfig
from llama_min.config import RopeScaling
from llama_min.hf_format import config_from_hf, config_to_hf, permute_rope_rows, state_dict_from_hf, state_dict_to_hf

from conftest import max_abs_diff, random_model, random_tokens

FIXTURE = Path(__file__).parent / "fixtures" / "hf_tiny_llama"
TOL = 1e-4  # max |Δlogit| allowed, float32


def load_fixture():
    hf_config = json.loads((FIXTURE / "config.json").read_text())
    hf_state = load_file(FIXTURE / "model.safetensors")
    reference = load_file(FIXTURE / "reference_logits.safetensors")
    return hf_config, hf_state, reference["input_ids"], reference["logits"]


def logit_diff(config: ModelConfig, state: dict, input_ids: torch.Tensor, expected: torch.Tensor) -> float:
    model = Llama(config).eval()
    if config.tie_embeddings:  # the mapped dict stores a tied head once, as checkpoints do
        state = {**state, "output.weight": state["tok_embeddings.weight"]}
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        logits, _ = model(input_ids)
    return max_abs_diff(logits, expected)


def test_fixture_is_small_and_exercises_gqa():
    size = sum(f.stat().st_size for f in FIXTURE.iterdir())
    assert size < 1_000_000, f"the parity fixture should stay well under 1 MB, it is {size:,} bytes"
    hf_config = json.loads((FIXTURE / "config.json").read_text())
    assert hf_config["num_key_value_heads"] < hf_config["num_attention_heads"], "the fixture must use GQA"


def test_config_from_hf_reads_every_setting():
    hf_config, *_ = load_fixture()
    config = config_from_hf(hf_config)
    got = (config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.vocab_size,
           config.hidden_dim, config.norm_eps, config.rope_theta, config.max_seq_len, config.tie_embeddings)
    expected = (64, 2, 4, 2, 128, 96, 0.01, 50000.0, 64, False)
    assert got == expected, f"(dim, n_layers, n_heads, n_kv_heads, vocab, hidden, eps, theta, max_seq_len, tied) = {got}, expected {expected}"


def test_config_from_hf_reads_older_transformers_layout():
    """Most published config.json files predate transformers 5: rope_theta at the top level, no
    rope_parameters, rope_scaling null. They must give the same ModelConfig."""
    hf_config, *_ = load_fixture()
    old_style = {k: v for k, v in hf_config.items() if k != "rope_parameters"}
    old_style.update(rope_theta=hf_config["rope_parameters"]["rope_theta"], rope_scaling=None)
    assert config_from_hf(old_style) == config_from_hf(hf_config), \
        f"v4-style config read as {config_from_hf(old_style)}, v5-style as {config_from_hf(hf_config)}"


def test_config_from_hf_refuses_unimplemented_rope_scaling_by_name():
    hf_config, *_ = load_fixture()
    scaled = {**hf_config, "rope_parameters": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0}}
    with pytest.raises(ValueError, match="rope scaling of type 'yarn'"):
        config_from_hf(scaled)


def test_config_from_hf_reads_the_scaling_when_both_rope_fields_are_present():
    """rope_parameters says "default" (a newer transformers' default) but rope_scaling holds Llama 3's
    scaling: the scaling is what the model uses, and must not be dropped."""
    hf_config, *_ = load_fixture()
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 16}
    both = {**hf_config, "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}, "rope_scaling": llama3}
    config = config_from_hf(both)
    assert config.rope_theta == 50000.0
    assert config.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 16), config.rope_scaling
    with pytest.raises(ValueError, match="disagree"):
        config_from_hf({**both, "rope_parameters": {"rope_type": "linear", "factor": 2.0}})


@pytest.mark.parametrize("attn_impl", ["plain", "sdpa"])
def test_logits_match_hugging_face(attn_impl):
    hf_config, hf_state, input_ids, expected = load_fixture()
    config = replace(config_from_hf(hf_config), attn_impl=attn_impl)
    diff = logit_diff(config, state_dict_from_hf(hf_state, config), input_ids, expected)
    assert diff <= TOL, f"{attn_impl}: max |Δlogit| vs Hugging Face = {diff:.3g} (allowed {TOL})"


def _skip_qk_unpermute(state, hf_state, config):
    for i in range(config.n_layers):
        state[f"layers.{i}.attention.wq.weight"] = hf_state[f"model.layers.{i}.self_attn.q_proj.weight"]
        state[f"layers.{i}.attention.wk.weight"] = hf_state[f"model.layers.{i}.self_attn.k_proj.weight"]


def _k_with_n_heads(state, hf_state, config):
    for i in range(config.n_layers):
        hf_k = hf_state[f"model.layers.{i}.self_attn.k_proj.weight"]
        state[f"layers.{i}.attention.wk.weight"] = permute_rope_rows(hf_k, config.n_heads, to_hf=False)


def _swap(a, b):
    def edit(state, hf_state, config):
        for i in range(config.n_layers):
            ka, kb = f"layers.{i}.{a}", f"layers.{i}.{b}"
            state[ka], state[kb] = state[kb], state[ka]
    return edit


WRONG_MAPPINGS = {
    "q and k rows not un-permuted": (_skip_qk_unpermute, {}),
    "k un-permuted with n_heads instead of n_kv_heads": (_k_with_n_heads, {}),
    "input and post-attention norms swapped": (_swap("attention_norm.weight", "ffn_norm.weight"), {}),
    "gate and up projections swapped": (_swap("feed_forward.w1.weight", "feed_forward.w3.weight"), {}),
    "rope_theta ignored (default 10000)": (None, {"rope_theta": 10000.0}),
    "rms_norm_eps ignored (default 1e-6)": (None, {"norm_eps": 1e-6}),
}


@pytest.mark.parametrize("mistake", list(WRONG_MAPPINGS))
def test_wrong_mapping_fails_the_comparison(mistake):
    """Each of these mistakes must push max |Δlogit| above the tolerance the parity test uses."""
    edit, config_change = WRONG_MAPPINGS[mistake]
    hf_config, hf_state, input_ids, expected = load_fixture()
    config = config_from_hf(hf_config)
    state = state_dict_from_hf(hf_state, config)
    if edit is not None:
        edit(state, hf_state, config)
    diff = logit_diff(replace(config, **config_change), state, input_ids, expected)
    assert diff > TOL, f"mistake '{mistake}' still gives max |Δlogit| = {diff:.3g} <= {TOL}: the parity test could not catch it"


def test_unknown_hf_tensor_is_refused_by_name():
    hf_config, hf_state, *_ = load_fixture()
    hf_state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    with pytest.raises(KeyError, match="q_norm"):
        state_dict_from_hf(hf_state, config_from_hf(hf_config))


# ---- live comparisons, when transformers is installed -------------------------------------------


def _random_hf_model(transformers, **overrides):
    hf_config = transformers.LlamaConfig(**{
        "vocab_size": 96, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 3,
        "num_attention_heads": 6, "num_key_value_heads": 1, "max_position_embeddings": 32,
        "rms_norm_eps": 1e-3, "rope_theta": 1e6, "tie_word_embeddings": True,
        "attn_implementation": "eager", **overrides})
    torch.manual_seed(7)
    model = transformers.LlamaForCausalLM(hf_config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
    return model


def test_live_hf_model_to_llama_min():
    """A fresh HF model with multi-query attention (1 kv head), tied embeddings and 3 layers."""
    transformers = pytest.importorskip("transformers")
    hf = _random_hf_model(transformers)
    config = config_from_hf(hf.config.to_dict())
    assert config.tie_embeddings and config.n_kv_heads == 1, f"config_from_hf lost settings: {config}"
    tokens = random_tokens(config, 2, 17)
    with torch.no_grad():
        expected = hf(input_ids=tokens).logits.float()
    state = state_dict_from_hf(hf.state_dict(), config)
    diff = logit_diff(config, state, tokens, expected)
    assert diff <= TOL, f"max |Δlogit| vs a live Hugging Face model = {diff:.3g} (allowed {TOL})"


def test_live_llama_min_to_hf_model():
    """The other direction, which export relies on: our weights and config loaded by transformers."""
    transformers = pytest.importorskip("transformers")
    config = ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=101, multiple_of=32,
                         norm_eps=1e-3, rope_theta=25000.0, max_seq_len=32)
    ours = random_model(config)
    hf_config = transformers.LlamaConfig(**config_to_hf(config), attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(hf_config).float().eval()
    hf.load_state_dict(state_dict_to_hf(ours.state_dict(), config), strict=True)
    tokens = random_tokens(config, 2, 15)
    with torch.no_grad():
        expected = hf(input_ids=tokens).logits.float()
        got, _ = ours(tokens)
    assert max_abs_diff(got, expected) <= TOL, f"max |Δlogit|, llama_min -> HF = {max_abs_diff(got, expected):.3g}"
