"""Tokenizers that are not a sentencepiece file: a Hugging Face tokenizer.json behind llama_min's
Tokenizer interface, and GGUF vocabularies rebuilt as tokenizer.json, checked against the original
tokenizer they came from (sentencepiece itself, or the `tokenizers` BPE that made the vocabulary)."""

import json
import shutil
from pathlib import Path

import pytest

from llama_min import load_tokenizer
from llama_min.checkpoint import tokenizer_file

from conftest import random_model, tiny_config
from convert_helpers import byte_level_gguf_vocab, run, train_byte_level_bpe, write_gguf

tokenizers = pytest.importorskip("tokenizers")

FIXTURE = Path(__file__).parent / "fixtures" / "hf_tiny_llama"
TEXTS = ["the quick brown fox jumps over the lazy dog", "in 2023 and 31415926", "Ж и 😀 ∑ ü café",
         "a  b   c\t\td\n\ne    ", "   indented", "Hello, World! (x=1; y=[2])", ""]


def test_tokenizer_json_model_converts_and_loads(tmp_path):
    """A Hugging Face model that ships only tokenizer.json: copied, and load_tokenizer() runs it."""
    original = train_byte_level_bpe(tmp_path)
    src = tmp_path / "hf"
    shutil.copytree(FIXTURE, src)
    original.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin|>", "eos_token": {"content": "<|end|>"}}))
    assert run(src, tmp_path / "out")[0] == 0
    path = tokenizer_file(tmp_path / "out")
    assert path is not None and path.name == "tokenizer.json", f"tokenizer.json was not copied: {path}"
    tok = load_tokenizer(path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, -1), "bos/eos should come from tokenizer_config.json"
    assert tok.vocab_size == original.get_vocab_size()
    for text in TEXTS:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids == [0] + original.encode(text).ids + [1], f"encode({text!r}) differs from the tokenizers package"
        assert tok.decode(ids) == text, f"decode(encode({text!r})) = {tok.decode(ids)!r}"


def sentencepiece_fields(sp_tokenizer):
    """The tokenizer.ggml.* fields llama.cpp's converter writes for a sentencepiece model."""
    sp = sp_tokenizer.sp
    n = sp.vocab_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    scores = [sp.get_score(i) for i in range(n)]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]

    def add(w):
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(sp.bos_id())
        w.add_eos_token_id(sp.eos_id())
        # llama.cpp copies the model's add_dummy_prefix; the encoding of "a" shows it
        w.add_add_space_prefix(sp.encode("a", out_type=str)[0].startswith("▁"))
    return add


@pytest.mark.parametrize("which", ["trained_tokenizer", "line_trained_tokenizer"])
def test_gguf_sentencepiece_vocab_encodes_like_sentencepiece(tmp_path, request, which):
    """Both sentencepiece styles: llama_min's (no dummy-prefix space) and LLaMA's own (a space before
    the text, which the rebuilt tokenizer must add and decoding strip)."""
    pytest.importorskip("gguf")
    trained_tokenizer = request.getfixturevalue(which)
    model = random_model(tiny_config(vocab_size=trained_tokenizer.vocab_size, multiple_of=32))
    write_gguf(model, tmp_path / "m.gguf", add_vocab=sentencepiece_fields(trained_tokenizer))
    code, out, err = run(tmp_path / "m.gguf", tmp_path / "out")
    assert code == 0, err
    tok = load_tokenizer(tmp_path / "out" / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id) == (trained_tokenizer.bos_id, trained_tokenizer.eos_id)
    for text in TEXTS:
        expected = trained_tokenizer.encode(text, bos=True)
        got = tok.encode(text, bos=True)
        assert got == expected, (f"{text!r}: GGUF vocabulary as tokenizer.json gives "
                                 f"{[tok.id_to_piece(i) for i in got]}, sentencepiece gives "
                                 f"{[trained_tokenizer.id_to_piece(i) for i in expected]}")
        assert tok.decode(got) == trained_tokenizer.decode(expected)


def test_gguf_byte_level_vocab_encodes_like_the_original(tmp_path):
    pytest.importorskip("gguf")
    original = train_byte_level_bpe(tmp_path)
    vocab = original.get_vocab()
    model = random_model(tiny_config(vocab_size=len(vocab), multiple_of=32))
    write_gguf(model, tmp_path / "m.gguf", add_vocab=byte_level_gguf_vocab(original, "gpt2", "<|begin|>", "<|end|>"))
    code, _, err = run(tmp_path / "m.gguf", tmp_path / "out")
    assert code == 0, err
    tok = load_tokenizer(tmp_path / "out" / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id) == (vocab["<|begin|>"], vocab["<|end|>"])
    for text in TEXTS:
        assert tok.encode(text, bos=False) == original.encode(text).ids, f"{text!r} encodes differently"
        assert tok.decode(tok.encode(text)) == text


def test_missing_tokenizers_package_is_said(tmp_path, trained_tokenizer, monkeypatch):
    pytest.importorskip("gguf")
    import sys

    model = random_model(tiny_config(vocab_size=trained_tokenizer.vocab_size, multiple_of=32))
    write_gguf(model, tmp_path / "m.gguf", add_vocab=sentencepiece_fields(trained_tokenizer))
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    code, out, err = run(tmp_path / "m.gguf", tmp_path / "out")
    assert code == 0, f"the weights should convert without `tokenizers`: {err}"
    assert "`tokenizers`" in out and "pip install tokenizers" in out, f"the missing package is not named:\n{out}"
    assert not (tmp_path / "out" / "tokenizer.json").exists()
