"""llama_min.from_scratch.bpe against a BPE written a second way here (on byte strings, each merge found by
scanning the whole pre-tokenised text again and applied with bytes.replace-like splitting), against the
example of Sennrich et al.'s Algorithm 1 worked by hand, and for the round trip on text no training saw."""

import random
from collections import Counter

import pytest

from llama_min.from_scratch.bpe import decode, encode, merge_pair, pretokenize, train_bpe

TEXT = ("low lower lowest newer wider new newest\n  the café's naïve résumé—2024, 'tis 1,000 words... "
        "aaaa aaa aa\tend\n") * 3


def naive_bpe(text: str, n_merges: int) -> list[tuple[bytes, bytes]]:
    """Merges as byte-string pairs: each round, count every adjacent pair over the pre-tokens (with repeats, in
    text order), take the most frequent (ties: the pair whose tokens come first by id), merge left to right."""
    words = [[bytes([b]) for b in piece.encode("utf-8")] for piece in pretokenize(text)]
    ids = {bytes([b]): b for b in range(256)}
    merges = []
    for _ in range(n_merges):
        counts = Counter(p for w in words for p in zip(w, w[1:]))
        if not counts:
            break
        top = max(counts.values())
        best = min((p for p, c in counts.items() if c == top), key=lambda p: (ids[p[0]], ids[p[1]]))
        merges.append(best)
        ids[best[0] + best[1]] = 256 + len(merges) - 1
        words = [merged(w, best) for w in words]
    return merges


def merged(word: list[bytes], pair: tuple[bytes, bytes]) -> list[bytes]:
    out, skip = [], False
    for i, sym in enumerate(word):
        if skip:
            skip = False
        elif i + 1 < len(word) and (sym, word[i + 1]) == pair:
            out.append(sym + word[i + 1])
            skip = True
        else:
            out.append(sym)
    return out


def as_bytes(merges):
    table = [bytes([b]) for b in range(256)]
    for a, b in merges:
        table.append(table[a] + table[b])
    return [(table[a], table[b]) for a, b in merges]


def test_training_agrees_with_the_naive_version():
    merges = train_bpe(TEXT, 256 + 40)
    assert len(merges) == 40
    assert as_bytes(merges) == naive_bpe(TEXT, 40)


def test_sennrich_example():
    """The vocabulary of Sennrich et al. 2016, section 3.2: low, lower, newest, widest with counts 5, 2, 6, 3, as
    words with a leading space. Counted by hand: (e, s) and (s, t) 9 each, the tie to the smaller (e, s); then
    (es, t) 9; then (' ', l), (l, o) and (o, w) 7 each, the tie to (' ', l) (32 < 108 < 111); then (o, w) 7
    against (' l', o) 7, whose first id is 258."""
    text = " low" * 5 + " lower" * 2 + " newest" * 6 + " widest" * 3
    assert as_bytes(train_bpe(text, 256 + 4)) == [(b"e", b"s"), (b"es", b"t"), (b" ", b"l"), (b"o", b"w")]


def test_merge_pair_does_not_overlap():
    a = ord("a")
    assert merge_pair((a, a, a), (a, a), 300) == (300, a)
    assert merge_pair((a, a, a, a), (a, a), 300) == (300, 300)


def test_round_trip_on_unseen_text():
    merges = train_bpe(TEXT, 256 + 60)
    rng = random.Random(0)
    alphabet = "abc xyz\n\t'é—漢😀0123.,"
    for _ in range(50):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert decode(encode(text, merges), merges) == text


def test_encode_compresses_and_uses_learned_tokens():
    merges = train_bpe(TEXT, 256 + 60)
    ids = encode(TEXT, merges)
    assert len(ids) < len(TEXT.encode("utf-8")) / 2
    assert decode(ids, merges) == TEXT
    assert encode(TEXT, []) == list(TEXT.encode("utf-8"))  # no merges: the bytes


def test_decode_joins_bytes_before_utf8():
    """é is two bytes; a token holding only its first must not become U+FFFD when the next token completes it."""
    e_acute = "é".encode("utf-8")
    merges = [(e_acute[0], ord("x"))]  # never fires on é: ids stay byte ids
    assert decode(list(e_acute), merges) == "é"


def test_pretokens_rebuild_the_text():
    assert "".join(pretokenize(TEXT)) == TEXT
    assert pretokenize(" hello  world's 42!") == [" hello", " ", " world", "'s", " 42", "!"]


def test_refuses_a_vocabulary_smaller_than_the_bytes():
    with pytest.raises(ValueError, match="256"):
        train_bpe("abc", 100)
