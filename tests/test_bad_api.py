"""Bad values met through the library rather than a script: configurations of impossible sizes or of
the wrong JSON types, misused generation calls, chat templates that run away, an adapter on a base that
was fine-tuned since. Each is one error that names the field or argument and says what to pass."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import random_model, tiny_config
from llama_min import Tokenizer, generate, load_tokenizer
from llama_min.config import ModelConfig
from llama_min.finetune.chat_template import ChatTemplate
from llama_min.finetune.templates import get_template
from llama_min.hf_format import config_from_hf
from llama_min.peft import PeftConfig, apply_peft, load_peft, save_peft

# Every ModelConfig field, with values a file or a flag can give that cannot be a model.
BAD_FIELDS = [("dim", 0), ("dim", -8), ("dim", "64"), ("dim", 64.5), ("dim", True), ("n_layers", 0), ("n_layers", -1),
              ("n_heads", 0), ("n_kv_heads", 0), ("vocab_size", 0), ("multiple_of", 0), ("max_seq_len", 0),
              ("hidden_dim", 0), ("ffn_dim_multiplier", -1.0), ("ffn_dim_multiplier", "1.3"), ("norm_eps", 0.0),
              ("norm_eps", math.nan), ("rope_theta", -1.0), ("rope_theta", math.inf), ("tie_embeddings", "yes"),
              ("attn_impl", 3), ("rope_scaling", {"kind": "linear", "factor": "8"}), ("rope_scaling", [8])]


@pytest.mark.parametrize("name, value", BAD_FIELDS, ids=[f"{n}={v!r}" for n, v in BAD_FIELDS])
def test_every_model_config_field_is_checked_by_name(name, value):
    fields = {**tiny_config().to_dict(), name: value}
    with pytest.raises(ValueError) as e:
        ModelConfig.from_dict(fields)
    shown = "factor" if name == "rope_scaling" and isinstance(value, dict) else name
    assert shown in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_rope_scaling_with_an_unknown_field_names_it():
    with pytest.raises(ValueError, match="unknown RopeScaling fields.*'scale'"):
        ModelConfig.from_dict({**tiny_config().to_dict(), "rope_scaling": {"kind": "linear", "scale": 2.0}})


HF = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 64, "intermediate_size": 48}


@pytest.mark.parametrize("key, value", [("num_attention_heads", 0), ("hidden_size", "32"), ("num_hidden_layers", -1),
                                        ("num_key_value_heads", 2.5), ("rms_norm_eps", "1e-5"), ("rope_scaling", 8)])
def test_hugging_face_config_values_are_checked_under_their_own_names(key, value):
    with pytest.raises(ValueError, match=f"^{key} must be"):
        config_from_hf({**HF, key: value})


@pytest.mark.parametrize("field, value", [("lora_rank", "8"), ("lora_alpha", "16"), ("lora_targets", "wq"),
                                          ("gate_tanh", 1), ("adapter_layers", 2.0)])
def test_peft_config_types_are_checked_by_name(field, value):
    with pytest.raises(ValueError, match=f"invalid PeftConfig: {field} must be"):
        PeftConfig.from_dict({"method": "lora", field: value})


# ---- generation called the wrong way -----------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config()).eval()


@pytest.mark.parametrize("prompts, message", [("hello", "not text"), (["hello"], "not text"),
                                              (torch.tensor([[1, 2, 3]]), "tensor.tolist()"),
                                              ([1, 2, 3], "a list of token-id lists"),
                                              ([list(torch.tensor([1, 2]))], "Python ints")])
def test_misused_prompts_are_named_with_the_fix(model, prompts, message):
    with pytest.raises(TypeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        generate(model, prompts, 5)


def test_stop_ids_none_means_no_stop_ids(model):
    assert generate(model, [[1, 2, 3]], 4, stop_ids=None) == generate(model, [[1, 2, 3]], 4, stop_ids=())


@pytest.mark.parametrize("kwargs, message", [({"temperature": math.nan}, "temperature must be >= 0 and finite"),
                                             ({"temperature": math.inf}, "temperature must be >= 0 and finite"),
                                             ({"max_new_tokens": 2.5}, "max_new_tokens must be at least 1"),
                                             ({"top_k": 2.0}, "top_k must be")])
def test_sampling_arguments_are_checked(model, kwargs, message):
    args = {"max_new_tokens": 4, "temperature": 1.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, [[1, 2]], args.pop("max_new_tokens"), **args)


def test_a_tokenizer_directory_names_the_file_to_pass(tmp_path, trained_tokenizer):
    (tmp_path / "tokenizer.model").write_bytes(trained_tokenizer.path.read_bytes())
    with pytest.raises(ValueError, match=f"is a directory; pass the tokenizer file in it \\({tmp_path}/tokenizer.model\\)"):
        Tokenizer(tmp_path)


def test_a_tokenizer_without_bos_gets_no_id_minus_one_from_a_template(tmp_path):
    """A tokenizer.json with no tokenizer_config.json has no BOS: templates leave it out, as encode does,
    rather than putting -1 (no token) into the prompt."""
    from tokenizers import Tokenizer as Raw, models, pre_tokenizers

    raw = Raw(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert tok.bos_id == -1
    for name in ("raw", "alpaca", "llama2-chat"):
        ids = get_template(name).encode(tok, [("user", "hello")])
        assert ids and min(ids) >= 0, (name, ids)


# ---- chat templates: programs from a downloaded file ----------------------------------------------------


def test_a_chat_template_that_includes_a_file_is_refused_at_once(trained_tokenizer):
    with pytest.raises(ValueError, match="line 2 reads another template file.*self-contained"):
        ChatTemplate("{{ bos_token }}\n{% include 'other.jinja' %}", trained_tokenizer, "DIR/chat_template.jinja")


def test_a_chat_template_that_builds_a_huge_text_is_stopped(trained_tokenizer):
    for text in ("{{ 'x' * 3000000000 }}", "{% set s = 'ab' * 10**9 %}{{ s }}", "{{ 10 ** 100000000 }}",
                 "{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}"):
        template = ChatTemplate(text, trained_tokenizer, "DIR/chat_template.jinja")
        with pytest.raises(ValueError, match="DIR/chat_template.jinja: the template builds a text of more than"):
            template.render([("user", "hi")])


def test_a_chat_template_that_loops_for_minutes_is_stopped(trained_tokenizer, monkeypatch):
    import llama_min.finetune.chat_template as chat_template

    monkeypatch.setattr(chat_template, "MAX_RENDER_SECONDS", 0.5)
    template = ChatTemplate("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                            trained_tokenizer, "DIR/chat_template.jinja")
    with pytest.raises(ValueError, match="ran for more than"):
        template.render([("user", "hi")])


# ---- adapters: the base must be the one they were trained on -------------------------------------------


def test_an_adapter_on_a_base_with_one_layer_fine_tuned_is_refused(tmp_path):
    """A partial fine-tune changes the top block only; the fingerprint covers every tensor, so the
    adapter trained on the original base is refused on it. A bfloat16 copy of the base still matches."""
    base = random_model(tiny_config())
    apply_peft(base, PeftConfig(method="lora"))
    save_peft(base, tmp_path / "lora")
    tuned = random_model(tiny_config())
    with torch.no_grad():  # what a few steps of --method partial --train_layers 1 do to the top block
        for p in tuned.layers[-1].feed_forward.parameters():
            p.add_(1e-2 * torch.randn_like(p))
    with pytest.raises(ValueError, match="another base model of the same shape.*layers.1.feed_forward"):
        load_peft(tuned, tmp_path / "lora")
    load_peft(random_model(tiny_config()).to(torch.bfloat16), tmp_path / "lora")
