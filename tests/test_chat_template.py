"""A checkpoint's own Jinja chat template (llama_min/finetune/chat_template.py), against transformers'
apply_chat_template on the same template and tokenizer (the reference: ids must be equal), and how
generate.py picks it, stops with it and reports what is wrong with it.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from llama_min import Tokenizer, generate, load_tokenizer
from llama_min.convert.hf_tokenizer import write_for_transformers
from llama_min.finetune.chat_template import ChatTemplate
from llama_min.finetune.templates import get_template, record_template
from llama_min.checkpoint import save_checkpoint

from conftest import random_model, tiny_config
from convert_helpers import CHATML, INST, train_byte_level_bpe
from scripts import run_script

transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")
pytest.importorskip("tokenizers")

# Block tags on lines of their own, indented: what trim_blocks and lstrip_blocks are for.
BLOCKS = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] == 'system' %}
System: {{ message['content'] }}
    {% elif message['role'] == 'user' %}
User: {{ message['content'] | tojson }}
    {% else %}
Assistant: {{ message['content'] }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
Assistant:
{%- endif %}"""
TEMPLATES = {"chatml": CHATML, "inst": INST, "blocks": BLOCKS}
CONVERSATION = [("system", "Answer  briefly."), ("user", "the quick brown fox in 2023?"),
                ("assistant", "  café naïve  Ж 😀\n\nyes"), ("user", "and   the lazy dog </s> <s>\tagain")]


@pytest.fixture(scope="module")
def tokenizer_dirs(trained_tokenizer, line_trained_tokenizer, tmp_path_factory):
    """Tokenizer directories transformers loads: both sentencepiece styles (exported by llama_min) and a
    byte-level BPE with ChatML's special tokens (a tokenizer.json from the `tokenizers` package)."""
    root = tmp_path_factory.mktemp("tokenizers")
    dirs = {}
    for name, tok in (("sentencepiece", trained_tokenizer), ("sentencepiece-prefix", line_trained_tokenizer)):
        dirs[name] = root / name
        dirs[name].mkdir()
        shutil.copyfile(tok.path, dirs[name] / "tokenizer.model")
        write_for_transformers(dirs[name] / "tokenizer.model", dirs[name], 256)
    dirs["byte-level"] = root / "byte-level"
    dirs["byte-level"].mkdir()
    bpe = train_byte_level_bpe(dirs["byte-level"], special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    bpe.save(str(dirs["byte-level"] / "tokenizer.json"))
    (dirs["byte-level"] / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    return dirs


def ours(directory) -> Tokenizer:
    return load_tokenizer(directory / "tokenizer.model" if (directory / "tokenizer.model").exists() else
                          directory / "tokenizer.json")


@pytest.mark.parametrize("kind", ["sentencepiece", "sentencepiece-prefix", "byte-level"])
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_chat_template_encodes_like_transformers(tokenizer_dirs, kind, name):
    hf = transformers.AutoTokenizer.from_pretrained(tokenizer_dirs[kind])
    tok = ours(tokenizer_dirs[kind])
    template = ChatTemplate(TEMPLATES[name], tok)
    for turns in (CONVERSATION[1:2], CONVERSATION, CONVERSATION[1:]):
        chat = [{"role": role, "content": content} for role, content in turns]
        expected = hf.apply_chat_template(chat, chat_template=TEMPLATES[name], add_generation_prompt=True,
                                          tokenize=True, return_dict=False)
        got = template.encode(tok, turns)
        assert got == expected, (f"{name} on {kind}:\nours {[tok.id_to_piece(i) for i in got]}\n"
                                 f"transformers {hf.convert_ids_to_tokens(expected)}")


def test_end_of_turn_stops_at_its_token_or_its_text(tokenizer_dirs):
    """ChatML's <|im_end|> is one token of the byte-level tokenizer: generation stops at its id; the
    sentencepiece tokenizer spells it in pieces: generation stops at its text."""
    byte_level = ours(tokenizer_dirs["byte-level"])
    chatml = ChatTemplate(CHATML, byte_level)
    assert chatml.stop_strings == ("<|im_end|>",)
    assert chatml.stop_ids(byte_level) == [byte_level.eos_id] == [byte_level.special_tokens["<|im_end|>"]]
    sentencepiece = ours(tokenizer_dirs["sentencepiece"])
    assert ChatTemplate(CHATML, sentencepiece).stop_ids(sentencepiece) == [sentencepiece.eos_id]
    inst = ChatTemplate(INST, sentencepiece)
    assert inst.stop_strings == ("</s>",) and inst.stop_ids(sentencepiece) == [sentencepiece.eos_id]
    # the named chatml template now stops at the token too, where it only looked for the text before
    assert get_template("chatml").stop_ids(byte_level) == [byte_level.special_tokens["<|im_end|>"],
                                                           byte_level.special_tokens["<|im_start|>"]]


# ---- generate.py ------------------------------------------------------------------------------------

FIGURES_PROMPT = " prompt tokens"


def prompt_tokens(err: str) -> int:
    return int(err.split("[")[-1].split(FIGURES_PROMPT)[0])


@pytest.fixture
def checkpoint(trained_tokenizer, tmp_path):
    model = random_model(tiny_config(vocab_size=trained_tokenizer.vocab_size, max_seq_len=192))
    save_checkpoint(model, tmp_path / "ckpt", tokenizer_path=trained_tokenizer.path)
    return tmp_path / "ckpt", model


def generate_py(*argv):
    return run_script("generate.py", *argv)


def test_generate_uses_the_chat_template_unless_a_name_is_recorded_or_given(checkpoint, trained_tokenizer):
    directory, _ = checkpoint
    (directory / "chat_template.jinja").write_text(INST)
    prompt = "the quick brown fox"
    inst_ids = ChatTemplate(INST, trained_tokenizer).encode(trained_tokenizer, [("user", prompt)])
    raw_ids = trained_tokenizer.encode(prompt)
    args = ("--checkpoint", directory, "--prompt", prompt, "--max_new_tokens", "2", "--temperature", "0")
    assert prompt_tokens(generate_py(*args).err) == len(inst_ids)  # auto, the default
    assert prompt_tokens(generate_py(*args, "--template", "auto").err) == len(inst_ids)
    assert prompt_tokens(generate_py(*args, "--template", "raw").err) == len(raw_ids)
    record_template(directory, "alpaca")  # a recorded name comes first
    alpaca_ids = get_template("alpaca").encode(trained_tokenizer, [("user", prompt)])
    assert prompt_tokens(generate_py(*args).err) == len(alpaca_ids)


def test_generation_config_eos_ends_the_answer(checkpoint, trained_tokenizer):
    """generation_config.json's eos ids stop generation: naming the greedy answer's third token as eos
    leaves two tokens of answer."""
    directory, model = checkpoint
    ids = trained_tokenizer.encode("the quick brown fox")
    third = generate(model, [ids], 3)[0][2]
    args = ("--checkpoint", directory, "--prompt", "the quick brown fox", "--max_new_tokens", "8", "--temperature", "0")
    assert " 8 new tokens" in generate_py(*args).err
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, third], "temperature": 0.3}))
    assert " 2 new tokens" in generate_py(*args).err


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "has no chat template"),
    (lambda d: (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }"),
     "not a valid Jinja template"),
    (lambda d: (d / "chat_template.jinja").write_text("{{ raise_exception('only system messages, please') }}"),
     "refused the conversation: only system messages, please"),
])
def test_template_problems_are_one_clear_line(checkpoint, setup, message):
    directory, _ = checkpoint
    setup(directory)
    done = generate_py("--checkpoint", directory, "--prompt", "hi", "--template", "auto", "--max_new_tokens", "2")
    assert done.code == 1 and message in done.err and len(done.err.strip().splitlines()) == 1, done.err


def test_missing_jinja2_is_named(checkpoint, monkeypatch):
    directory, _ = checkpoint
    (directory / "chat_template.jinja").write_text(CHATML)
    monkeypatch.setitem(sys.modules, "jinja2", None)
    done = generate_py("--checkpoint", directory, "--prompt", "hi", "--max_new_tokens", "2")
    assert done.code == 1 and "pip install jinja2" in done.err, done.err


# Llama 3's chat format (Meta's Llama 3 model card, "Prompt format"): a header per message, <|eot_id|> ending
# each turn; written here from that description.
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
LLAMA3_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def test_a_llama3_style_tokenizer_json_and_chat_template(tmp_path):
    """The tokenizer.json path with Llama 3's special tokens and chat format: BOS and EOS from
    tokenizer_config.json, the template's ids equal to transformers', generation stopping at <|eot_id|>
    (a single token) and at generation_config.json's eos ids."""
    from llama_min.finetune.chat_template import generation_eos_ids

    bpe = train_byte_level_bpe(tmp_path, special_tokens=LLAMA3_SPECIAL)
    bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "chat_template": LLAMA3}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [
        bpe.token_to_id("<|end_of_text|>"), bpe.token_to_id("<|eot_id|>")]}))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id) == (bpe.token_to_id("<|begin_of_text|>"), bpe.token_to_id("<|eot_id|>"))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    template = ChatTemplate(LLAMA3, tok)
    chat = [{"role": role, "content": content} for role, content in CONVERSATION]
    assert template.encode(tok, CONVERSATION) == hf.apply_chat_template(chat, add_generation_prompt=True,
                                                                         tokenize=True, return_dict=False)
    assert tok.special_tokens["<|eot_id|>"] in template.stop_ids(tok)
    assert set(generation_eos_ids(tmp_path)) == {bpe.token_to_id("<|end_of_text|>"), bpe.token_to_id("<|eot_id|>")}
    text = "naïve café 1999 — ✓"
    assert tok.decode(tok.encode(text, bos=True)) == text
