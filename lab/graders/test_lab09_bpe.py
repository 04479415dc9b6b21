"""Lab 9, byte-level BPE: ``count_pairs``, ``merge_pair``, ``train_bpe``, ``encode`` and ``decode`` in
llama_min/from_scratch/bpe.py, against lab/fixtures/lab09.*. Texts, merges and ids are stored as int64 tensors
(a text as its UTF-8 bytes); ``encode`` and ``decode`` are given the reference's merges, so that each function
is graded on its own."""

import pytest
import torch

from lab.graders.check import LabFixtures, check, fail
from llama_min.from_scratch.bpe import count_pairs, decode, encode, merge_pair, train_bpe

LAB = LabFixtures(9)


def ids(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int64)


def text_of(t: torch.Tensor) -> str:
    return bytes(t.tolist()).decode("utf-8")


def as_text_tensor(text, what) -> torch.Tensor:
    __tracebackhide__ = True
    if not isinstance(text, str):
        fail(f"{what} returned a {type(text).__name__}; expected a str")
    return ids(text.encode("utf-8", errors="surrogatepass"))


def merges_of(t: torch.Tensor) -> list[tuple[int, int]]:
    return [tuple(row) for row in t.tolist()]


def test_count_pairs():
    """Words low ×5, ' lower' ×2, ' newest' ×6, ' widest' ×3, aaaa ×4, ' café' ×2 (as byte tuples)."""
    case = LAB.case("count_pairs")
    words = {tuple(w.encode("utf-8")): f for w, f in case.params["words"].items()}
    counts = count_pairs(words)
    check(ids(counts.get(tuple(p), 0) for p in case["pairs"].tolist()), case,
          "count_pairs(words)[pair] for every adjacent pair of the words, in sorted order")


def test_merge_pair():
    """aaa and aaaa with (a, a), banana with (a, n), xyz with (y, z), ab with (a, a) (no occurrence)."""
    case = LAB.case("merge_pair")
    got = tuple(ids(merge_pair(tuple(w.encode("utf-8")), tuple(p), case.params["new_id"]))
                for w, p in case.params["words"])
    check(got, case, "merge_pair(word, pair, 300) for aaa, aaaa, banana, xyz, ab")


@pytest.mark.parametrize("name", ["small", "larger"])
def test_train_bpe(name):
    """A 280-byte text with accents, a dash, digits and repeated letters: 12 merges, then 60."""
    case = LAB.case(f"train_bpe.{name}")
    vocab = case.params["vocab_size"]
    merges = train_bpe(text_of(case["text"]), vocab)
    check(torch.tensor([list(p) for p in merges], dtype=torch.int64).reshape(-1, 2), case,
          f"train_bpe(text, vocab_size={vocab}) as (merges, 2)")


@pytest.mark.parametrize("name", ["seen", "unseen"])
def test_encode(name):
    """The training text, and a sentence it never saw (with é, ï and —), with the reference's 60 merges."""
    case = LAB.case(f"encode.{name}")
    check(ids(encode(text_of(case["text"]), merges_of(case["merges"]))), case, f"encode({name} text, merges)")


@pytest.mark.parametrize("name", ["text", "invalid"])
def test_decode(name):
    """The ids of the unseen sentence plus a dash as three single-byte tokens; and o, é's first byte alone, k,
    0xFF (invalid UTF-8)."""
    case = LAB.case(f"decode.{name}")
    what = f"decode({case['ids'].tolist()[:8]}…, merges)"
    try:
        text = decode(case["ids"].tolist(), merges_of(case["merges"]))
    except UnicodeDecodeError as e:
        fail(f"{what} raised UnicodeDecodeError: {e}\nLikely mistake: invalid bytes must become U+FFFD: a model can "
             "generate any byte sequence: decode with errors='replace'")
    check(as_text_tensor(text, what), case, what + " as UTF-8 bytes")


def test_round_trip():
    """decode(encode(text)) gives the text back, for text with characters of 1 to 4 UTF-8 bytes."""
    case = LAB.case("encode.seen")
    merges = merges_of(case["merges"])
    for text in ("", "a", "  two  spaces\n\n", "naïve café — 漢字 😀 1,000", text_of(case["text"])):
        back = decode(encode(text, merges), merges)
        if back != text:
            fail(f"decode(encode({text!r})) gave {back!r}")
