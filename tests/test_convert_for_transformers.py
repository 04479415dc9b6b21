"""What a conversion carries for transformers users, checked with transformers itself (the reference):
the tokenizer of a llama_min checkpoint exported with --to hf (the ids of AutoTokenizer against
llama_min's Tokenizer), the chat template and generation config through HF -> llama_min -> HF, and a
text-generation pipeline on an export against generate.py's greedy answer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from llama_min.checkpoint import save_checkpoint

from conftest import random_model, tiny_config
from convert_helpers import CHATML, INST, MIXED_TEXT, random_hf_model, run, train_byte_level_bpe
from scripts import run_script

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

TEXTS = ["the quick brown fox jumps over the lazy dog", "in 2023 and 31415926", "a  b   c\t\td\n\ne    ",
         "   indented", "\nnewline first", " ", "Ж и 😀 ∑ ü café naïve", "Hello, World! (x=1; y=[2])",
         *MIXED_TEXT.splitlines()]

def tiny_checkpoint(tokenizer, directory: Path, max_seq_len: int = 64, avoid_bytes: bool = False) -> Path:
    """A tiny random model with ``tokenizer``. ``avoid_bytes``: its output head never picks a byte piece
    (<0xNN>), whose invalid UTF-8 runs transformers and sentencepiece spell differently (one U+FFFD per
    byte, or the valid bytes kept), so that greedy answers can be compared as text."""
    model = random_model(tiny_config(vocab_size=tokenizer.vocab_size, max_seq_len=max_seq_len))
    if avoid_bytes:
        byte_ids = [i for i in range(tokenizer.vocab_size) if tokenizer.sp.is_byte(i)]
        with torch.no_grad():
            model.output.weight[byte_ids] = 0.0
    save_checkpoint(model, directory, tokenizer_path=tokenizer.path)
    return directory


@pytest.mark.parametrize("which", ["trained_tokenizer", "line_trained_tokenizer"])
def test_exported_tokenizer_gives_llama_mins_ids_in_transformers(tmp_path, request, which):
    """Tokenizer.train's choices (no dummy prefix, digits split, byte fallback, text as it is) and LLaMA's
    own (a dummy-prefix space before the text): AutoTokenizer on the export encodes and decodes alike."""
    tokenizer = request.getfixturevalue(which)
    code, out, err = run(tiny_checkpoint(tokenizer, tmp_path / "ckpt"), tmp_path / "hf", "--to", "hf")
    assert code == 0 and "note" not in out, err + out
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (tokenizer.bos_id, tokenizer.eos_id, 0)
    assert hf.model_max_length == 64
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        assert ids == tokenizer.encode(text), (f"{text!r}: transformers {hf.convert_ids_to_tokens(ids)}, llama_min "
                                               f"{[tokenizer.id_to_piece(i) for i in tokenizer.encode(text)]}")
        assert hf.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids)


def test_without_tokenizers_the_config_still_names_the_class(tmp_path, trained_tokenizer, monkeypatch):
    """transformers can still read tokenizer.model then (with protobuf); the note says what is missing."""
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    code, out, err = run(tiny_checkpoint(trained_tokenizer, tmp_path / "ckpt"), tmp_path / "hf", "--to", "hf")
    assert code == 0, err
    assert "pip install tokenizers" in out, out
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["add_prefix_space"] is False
    assert not (tmp_path / "hf" / "tokenizer.json").exists()


def test_a_normalising_sentencepiece_model_gets_no_wrong_tokenizer_json(tmp_path, trained_tokenizer):
    """Sentencepiece's defaults (NFKC, runs of spaces collapsed) are not rebuilt: rather no tokenizer.json
    than one that encodes differently."""
    spm.SentencePieceTrainer.train(input=str(trained_tokenizer.path.parent / "corpus.txt"),
                                   model_prefix=str(tmp_path / "tokenizer"), model_type="bpe", vocab_size=300,
                                   byte_fallback=True, minloglevel=2)
    from llama_min import Tokenizer

    code, out, err = run(tiny_checkpoint(Tokenizer(tmp_path / "tokenizer.model"), tmp_path / "ckpt"), tmp_path / "hf",
                         "--to", "hf")
    assert code == 0, err
    assert "tokenizer.json not written" in out and "normalises" in out, out
    assert not (tmp_path / "hf" / "tokenizer.json").exists()


# ---- chat template and generation config ------------------------------------------------------------

GENERATION = {"bos_token_id": 1, "eos_token_id": [2, 0], "do_sample": True, "temperature": 0.6, "top_p": 0.9}


@pytest.mark.parametrize("where", ["tokenizer_config.json", "chat_template.jinja"])
def test_chat_template_and_generation_config_survive_hf_to_llama_min_to_hf(tmp_path, where):
    """Both places a Hugging Face model keeps its template. Back in Hugging Face layout, transformers
    reads the same template and generation config, and its chat pipeline answers as on the source."""
    pytest.importorskip("jinja2")
    src = tmp_path / "src"
    bpe = train_byte_level_bpe(tmp_path, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    random_hf_model(vocab=bpe.get_vocab_size()).save_pretrained(src)
    bpe.save(str(src / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    if where == "tokenizer_config.json":
        config["chat_template"] = CHATML
    else:
        (src / "chat_template.jinja").write_text(CHATML)
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    (src / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    (src / "generation_config.json").write_text(json.dumps(GENERATION))

    assert run(src, tmp_path / "ours")[0] == 0
    assert (tmp_path / "ours" / "chat_template.jinja").read_text() == CHATML
    assert json.loads((tmp_path / "ours" / "generation_config.json").read_text()) == GENERATION
    code, _, err = run(tmp_path / "ours", tmp_path / "back", "--to", "hf")
    assert code == 0, err
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "back" / name).read_bytes() == (src / name).read_bytes(), f"{name} changed"

    chat = [{"role": "user", "content": "the quick brown fox in 2023"}]
    source, back = (transformers.AutoTokenizer.from_pretrained(d) for d in (src, tmp_path / "back"))
    assert back.chat_template == CHATML
    assert (back.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
            == source.apply_chat_template(chat, add_generation_prompt=True, return_dict=False))
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "back")
    assert (generation.eos_token_id, generation.temperature, generation.top_p) == ([2, 0], 0.6, 0.9)
    answers = [transformers.pipeline("text-generation", model=str(d), device="cpu")(
               chat, max_new_tokens=4, do_sample=False)[0]["generated_text"][-1] for d in (src, tmp_path / "back")]
    assert answers[0] == answers[1] and answers[1]["role"] == "assistant"


def test_pipeline_on_an_export_answers_as_generate_py(tmp_path, trained_tokenizer):
    """A model trained here (a tiny random one, Tokenizer.train's tokenizer) with a chat template, exported:
    transformers' chat pipeline and generate.py give the same greedy answer to the same messages."""
    pytest.importorskip("jinja2")
    ckpt = tiny_checkpoint(trained_tokenizer, tmp_path / "ckpt", max_seq_len=128, avoid_bytes=True)
    (ckpt / "chat_template.jinja").write_text(INST)
    code, out, err = run(ckpt, tmp_path / "hf", "--to", "hf")
    assert code == 0 and "note" not in out, err + out
    system, question = "answer in words", "the quick brown fox in 2023 and"
    pipe = transformers.pipeline("text-generation", model=str(tmp_path / "hf"), device="cpu")
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    expected = pipe(messages, max_new_tokens=10, do_sample=False)[0]["generated_text"][-1]["content"]
    done = run_script("generate.py", "--checkpoint", ckpt, "--system", system, "--prompt", question,
                      "--temperature", "0", "--max_new_tokens", "10")
    assert done.code == 0, done.err
    assert done.out.startswith(question + "\n")
    answer = done.out[len(question) + 1:].removesuffix("\n")
    assert expected.strip() and answer == expected, f"generate.py {answer!r}, transformers {expected!r}"


def test_an_unreadable_generation_config_is_one_clear_line(tmp_path, trained_tokenizer):
    ckpt = tiny_checkpoint(trained_tokenizer, tmp_path / "ckpt")
    (ckpt / "generation_config.json").write_text('{"eos_token_id": [2,')
    code, out, err = run(ckpt, tmp_path / "hf", "--to", "hf")
    assert code == 1 and "generation_config.json: not readable JSON" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "hf").exists()
