"""What a conversion carries for transformers users, checked with transformers itself (the reference):
the tokenizer of a llama_min checkpoint exported with --to hf (the ids of AutoTokenizer against
llama_min's Tokenizer).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from conftest import random_model, tiny_config
from convert_helpers import MIXED_TEXT, run

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

TEXTS = ["the quick brown fox jumps over the lazy dog", "in 2023 and 31415926", "a  b   c\t\td\n\ne    ",
         "   indented", "\nnewline first", " ", "Ж и 😀 ∑ ü café naïve", "Hello, World! (x=1; y=[2])",
         *MIXED_TEXT.splitlines()]


def save_checkpoint(tokenizer, directory: Path, max_seq_len: int = 64) -> Path:
    model = random_model(tiny_config(vocab_size=tokenizer.vocab_size, max_seq_len=max_seq_len))
    model.save_checkpoint(directory, tokenizer_path=tokenizer.path)
    return directory


@pytest.mark.parametrize("which", ["trained_tokenizer", "line_trained_tokenizer"])
def test_exported_tokenizer_gives_llama_mins_ids_in_transformers(tmp_path, request, which):
    """Tokenizer.train's choices (no dummy prefix, digits split, byte fallback, text as it is) and LLaMA's
    own (a dummy-prefix space before the text): AutoTokenizer on the export encodes and decodes alike."""
    tokenizer = request.getfixturevalue(which)
    code, out, err = run(save_checkpoint(tokenizer, tmp_path / "ckpt"), tmp_path / "hf", "--to", "hf")
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
    code, out, err = run(save_checkpoint(trained_tokenizer, tmp_path / "ckpt"), tmp_path / "hf", "--to", "hf")
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

    code, out, err = run(save_checkpoint(Tokenizer(tmp_path / "tokenizer.model"), tmp_path / "ckpt"), tmp_path / "hf",
                         "--to", "hf")
    assert code == 0, err
    assert "tokenizer.json not written" in out and "normalises" in out, out
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
