"""RoPE scaling of long-context models (Llama 3.1+: "llama3"; position interpolation: "linear"), against
Hugging Face transformers as the independent reference: its frequencies, and the logits of a random
LlamaForCausalLM with each scaling, read through every way a model reaches llama_min (a Hugging Face
directory, Meta's params.json, a GGUF file) and written back out."""

import json

import pytest
import torch

from conftest import max_abs_diff
from convert_helpers import run, tensors_of, write_gguf
from llama_min import Llama, ModelConfig
from llama_min.checkpoint import load_checkpoint
from llama_min.config import RopeScaling
from llama_min.rope import RotaryEmbedding

transformers = pytest.importorskip("transformers")

HEAD_DIM, THETA = 16, 10000.0
SCALINGS = {
    # original context 16 tokens, so that the test sequences (40 tokens) go well past it
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "linear": {"rope_type": "linear", "factor": 4.0},
}
OURS = {"llama3": RopeScaling("llama3", 8.0, 1.0, 4.0, 16), "linear": RopeScaling("linear", 4.0)}


def hf_config(kind: str):
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=97, max_position_embeddings=64,
                                    rms_norm_eps=1e-5, rope_theta=THETA, rope_scaling=SCALINGS[kind],
                                    tie_word_embeddings=False)


def hf_model(kind: str):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config(kind)).eval()
    with torch.no_grad():  # weights large enough that positions matter
        for p in model.parameters():
            p.normal_(0.0, 0.5 if p.dim() > 1 else 0.1).add_(1.0 if p.dim() == 1 else 0.0)
    return model


def tokens():
    return torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", SCALINGS)
def test_frequencies_match_transformers(kind):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    reference, attention_factor = ROPE_INIT_FUNCTIONS[kind](hf_config(kind), "cpu")
    assert attention_factor == 1.0  # neither scaling rescales the attention scores
    ours = RotaryEmbedding(HEAD_DIM, THETA, OURS[kind]).inv_freq(torch.device("cpu"))
    unscaled = RotaryEmbedding(HEAD_DIM, THETA).inv_freq(torch.device("cpu"))
    assert not torch.allclose(ours, unscaled), "premise: the scaling changes some frequencies"
    torch.testing.assert_close(ours, reference.float(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind", SCALINGS)
def test_hf_checkpoint_converts_and_exports_with_its_scaling(kind, tmp_path):
    hf = hf_model(kind)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    code, _, err = run(tmp_path / "hf", tmp_path / "ours")
    assert code == 0, err
    model = load_checkpoint(tmp_path / "ours").eval()
    assert model.config.rope_scaling == OURS[kind]
    x = tokens()
    with torch.no_grad():
        expected = hf(input_ids=x).logits
        got, _ = model(x)
        unscaled = Llama(ModelConfig(**{**model.config.to_dict(), "rope_scaling": None})).eval()
        unscaled.load_state_dict(model.state_dict())
    assert max_abs_diff(got, expected) <= 1e-4, f"{kind}: max |Δlogit| {max_abs_diff(got, expected):.3g}"
    assert max_abs_diff(unscaled(x)[0], expected) > 1e-2, "premise: without the scaling the logits differ"
    # and back out: transformers reads the same scaling from our export
    code, _, err = run(tmp_path / "ours", tmp_path / "back", "--to", "hf")
    assert code == 0, err
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert back.config.rope_parameters["rope_type"] == kind
    with torch.no_grad():
        assert max_abs_diff(back(input_ids=x).logits, expected) <= 1e-4


def test_meta_params_use_scaled_rope_is_llama3_scaling(tmp_path):
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 97, "multiple_of": 16,
              "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}
    (tmp_path / "params.json").write_text(json.dumps(params))
    assert ModelConfig.from_params_json(tmp_path / "params.json").rope_scaling == RopeScaling("llama3", 8.0)
    (tmp_path / "params.json").write_text(json.dumps({**params, "rope_scaling_factor": 32.0}))  # Llama 3.2 1B/3B
    assert ModelConfig.from_params_json(tmp_path / "params.json").rope_scaling == RopeScaling("llama3", 32.0)


def test_gguf_rope_freqs_are_read_as_llama3_scaling(tmp_path):
    """llama.cpp stores Llama 3's rule as rope_freqs.weight = unscaled / scaled frequency; the divisors
    here come from transformers' frequencies, not from llama_min."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    import gguf

    hf = hf_model("llama3")
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert run(tmp_path / "hf", tmp_path / "ours")[0] == 0
    model = load_checkpoint(tmp_path / "ours")
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config("llama3"), "cpu")
    unscaled = 1.0 / THETA ** (torch.arange(0, HEAD_DIM, 2).double() / HEAD_DIM)  # RoFormer's θ_i

    def add_metadata(w):
        w.add_uint32("llama.rope.scaling.original_context_length", 16)

    write_gguf(model, tmp_path / "m.gguf", add_vocab=add_metadata,
               extra_tensors={gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight":
                              (unscaled / scaled.double()).float().numpy()})
    code, _, err = run(tmp_path / "m.gguf", tmp_path / "from_gguf")
    assert code == 0, err
    converted = load_checkpoint(tmp_path / "from_gguf").eval()
    assert converted.config.rope_scaling == OURS["llama3"]
    assert set(tensors_of(tmp_path / "from_gguf")) == set(tensors_of(tmp_path / "ours")), "rope_freqs is no weight"
    with torch.no_grad():
        assert max_abs_diff(converted(tokens())[0], hf(input_ids=tokens()).logits) <= 1e-4
