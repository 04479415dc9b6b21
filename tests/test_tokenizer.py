"""The tokenizer: a small LLaMA-style sentencepiece model trained on text written by the tests
(conftest.write_training_text), checked for the properties LLaMA's tokenizer has (section 2.1):
lossless round trips, digits split, byte fallback for unseen characters, LLaMA's special ids."""

import re

import pytest

from llama_min import Tokenizer, load_tokenizer

BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")

ROUND_TRIP_TEXTS = {
    "words": "the quick brown fox jumps over the lazy dog",
    "digits": "in 2023 and 31415926 and 007",
    "unseen unicode (byte fallback)": "Ж и 😀 ∑ 中文 — ü",
    "whitespace runs": "a  b   c\t\td\n\ne    ",
    "leading spaces": "   indented",
    "empty": "",
    "punctuation": "Hello, World! (x=1; y=[2]) {'k': \"v\"}",
}


def test_special_ids_are_llamas(trained_tokenizer):
    tok = trained_tokenizer
    got = (tok.bos_id, tok.eos_id, tok.pad_id, tok.id_to_piece(0), tok.id_to_piece(1), tok.id_to_piece(2))
    expected = (1, 2, -1, "<unk>", "<s>", "</s>")
    assert got == expected, f"(bos, eos, pad, piece 0, piece 1, piece 2) = {got}, LLaMA uses {expected}"
    assert tok.vocab_size == 400, f"trained with vocab_size=400, loaded tokenizer has {tok.vocab_size}"


@pytest.mark.parametrize("bos, eos", [(True, False), (False, False), (True, True), (False, True)])
def test_bos_and_eos_are_added_on_request(trained_tokenizer, bos, eos):
    tok = trained_tokenizer
    plain = tok.encode("the sea", bos=False, eos=False)
    ids = tok.encode("the sea", bos=bos, eos=eos)
    expected = [tok.bos_id] * bos + plain + [tok.eos_id] * eos
    assert ids == expected, f"encode(bos={bos}, eos={eos}) gave {ids}, expected {expected}"
    assert tok.bos_id not in plain and tok.eos_id not in plain, "bos/eos added although not requested"


def test_default_encode_adds_bos_only(trained_tokenizer):
    ids = trained_tokenizer.encode("the sea")
    assert ids[0] == trained_tokenizer.bos_id and ids[-1] != trained_tokenizer.eos_id, \
        f"encode(text) should start with bos and not end with eos: {ids}"


@pytest.mark.parametrize("name", list(ROUND_TRIP_TEXTS))
def test_round_trip(trained_tokenizer, name):
    text = ROUND_TRIP_TEXTS[name]
    ids = trained_tokenizer.encode(text, bos=True, eos=True)
    decoded = trained_tokenizer.decode(ids)
    assert decoded == text, f"{name}: decode(encode({text!r})) = {decoded!r}"
    assert all(0 <= i < trained_tokenizer.vocab_size for i in ids), f"{name}: id out of range in {ids}"


def test_unseen_characters_fall_back_to_bytes(trained_tokenizer):
    tok = trained_tokenizer
    ids = tok.encode("😀", bos=False)
    pieces = [tok.id_to_piece(i) for i in ids]
    assert 0 not in ids, f"an unseen character became <unk>: {pieces}"
    byte_pieces = [p for p in pieces if BYTE_PIECE.fullmatch(p)]
    assert byte_pieces == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"], \
        f"'😀' is UTF-8 F0 9F 98 80 and should become those four byte pieces; got {pieces}"


def test_digits_are_split(trained_tokenizer):
    tok = trained_tokenizer
    pieces = [tok.id_to_piece(i) for i in tok.encode("2023 31415", bos=False)]
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
    assert all(len(p.lstrip("▁")) == 1 for p in digit_pieces), f"numbers should be split into single digits: {pieces}"
    # The corpus repeats "2023" and "31415" hundreds of times; a trainer that merged digits would have
    # learned multi-digit pieces. None may exist.
    merged = [p for p in map(tok.id_to_piece, range(tok.vocab_size))
              if not BYTE_PIECE.fullmatch(p) and sum(c.isdigit() for c in p) > 1]
    assert not merged, f"the vocabulary contains multi-digit pieces: {merged[:10]}"


def test_training_learned_merges(trained_tokenizer):
    """BPE, not characters: frequent words of the corpus are single pieces."""
    tok = trained_tokenizer
    pieces = [tok.id_to_piece(i) for i in tok.encode("runs to the sea", bos=False)]
    assert pieces[-2:] == ["▁the", "▁sea"], f"' the sea' should be two learned pieces, got {pieces}"


def test_training_learns_text_as_it_is_encoded(trained_tokenizer, line_trained_tokenizer):
    """Documents are encoded whole, newlines included: the trainer must learn from that stream.

    The reference is sentencepiece fed the same file line by line, as LLaMA's tokenizer was trained
    (conftest.line_trained_tokenizer): it never sees a newline, and adds a space before each line's
    first word, so it learns "▁the" but not the "the" that follows a newline, which falls apart.
    """
    tok, by_line = trained_tokenizer, line_trained_tokenizer
    text = "1999\nthe sea"
    pieces = [tok.id_to_piece(i) for i in tok.encode(text, bos=False)]
    assert pieces == ["1", "9", "9", "9", "\n", "the", "▁sea"], \
        f"the newline should be a piece of its own and 'the' after it one learned piece; got {pieces}"
    assert tok.decode(tok.encode(text, bos=False)) == text
    line_pieces = [by_line.id_to_piece(i) for i in by_line.encode(text, bos=False)]
    assert len(line_pieces) > len(pieces), \
        f"the reference trained on lines should need more pieces here; got {line_pieces} against {pieces}"
    corpus = (tok.path.parent / "corpus.txt").read_text(encoding="utf-8")
    assert len(tok.encode(corpus)) < len(by_line.encode(corpus)), \
        "trained on paragraphs, the tokenizer should encode its own corpus in fewer tokens than one trained on lines"


def test_reloading_gives_the_same_tokenizer(trained_tokenizer):
    again = Tokenizer(trained_tokenizer.path)
    text = ROUND_TRIP_TEXTS["punctuation"]
    assert again.encode(text) == trained_tokenizer.encode(text), "the saved tokenizer file encodes differently"


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist.model"):
        Tokenizer(tmp_path / "does_not_exist.model")


def test_by_line_is_llamas_own_recipe(trained_tokenizer, line_trained_tokenizer, tmp_path):
    """by_line=True (the lab's choice) trains on lines with a dummy-prefix space, exactly as
    sentencepiece does when fed the file directly (the conftest reference)."""
    corpus = trained_tokenizer.path.parent / "corpus.txt"
    tok = Tokenizer.train([corpus], tmp_path / "tokenizer.model", vocab_size=trained_tokenizer.vocab_size, by_line=True)
    ours = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    reference = [line_trained_tokenizer.id_to_piece(i) for i in range(line_trained_tokenizer.vocab_size)]
    assert ours == reference, "by_line=True should learn the same pieces as sentencepiece fed the file by lines"
    assert tok.id_to_piece(tok.encode("sea", bos=False)[0]) == "▁sea", "LLaMA's recipe puts a space before the text"


def test_training_twice_gives_the_same_file(tmp_path):
    """No process id or temporary path may end up inside the model: caches are keyed on its bytes."""
    from conftest import write_training_text

    write_training_text(tmp_path / "corpus.txt")
    for name in ("a", "b"):
        Tokenizer.train([tmp_path / "corpus.txt"], tmp_path / name / "tokenizer.model", vocab_size=400)
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == (tmp_path / "b" / "tokenizer.model").read_bytes()
    assert str(tmp_path).encode() not in (tmp_path / "a" / "tokenizer.model").read_bytes()


@pytest.mark.parametrize("kind", ["sentencepiece", "byte-level tokenizer.json"])
def test_text_bytes_of_the_tokens_add_up_to_the_text(trained_tokenizer, tmp_path, kind):
    """Bits per byte divides by the text's UTF-8 length, counted token by token: for either kind of
    tokenizer the counts of a text's tokens must add up to its length in bytes (BOS adds none)."""
    from convert_helpers import MIXED_TEXT, train_byte_level_bpe

    if kind == "sentencepiece":
        tok = trained_tokenizer
    else:
        pytest.importorskip("tokenizers")
        train_byte_level_bpe(tmp_path).save(str(tmp_path / "tokenizer.json"))
        (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<|begin|>", "eos_token": "<|end|>"}')
        tok = load_tokenizer(tmp_path / "tokenizer.json")
        assert tok.bos_id >= 0
    for text in (MIXED_TEXT, "naïve café 1999 — ✓\n\n  x"):
        ids = tok.encode(text, bos=True)
        assert sum(tok.text_bytes(i) for i in ids) == len(text.encode("utf-8")), (kind, text)
