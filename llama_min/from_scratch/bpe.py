"""Byte-level byte-pair encoding: the tokenizer of GPT-2 and its successors, beside the sentencepiece one of
tokenizer.py.

BPE (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword Units", Algorithm 1) starts
from single symbols and repeatedly merges the most frequent adjacent pair into a new symbol; the list of
merges, in the order they were learned, is the tokenizer. GPT-2 (Radford et al. 2019, section 2.2) takes bytes
as the starting symbols, so every text is encodable with no unknown token: ids 0 … 255 are the bytes, id
256 + i is the i-th merge.

Pairs never cross pre-token boundaries. The text is first cut into pre-tokens, here words with their leading
space, runs of digits, runs of other symbols and runs of whitespace (GPT-2's pattern, simplified to what
Python's ``re`` writes without the ``regex`` package: letters are ASCII letters, other letters count as symbols).
Training counts each distinct pre-token once, with its frequency.

    train_bpe(text, vocab_size) -> merges      the most frequent pair first; ties go to the smallest (a, b)
    encode(text, merges) -> ids                 per pre-token, merge the pair learned earliest, until none is left
    decode(ids, merges) -> text                 concatenate the tokens' bytes, then decode UTF-8 once

Byte-level tokens may split a character's UTF-8 bytes, so decoding joins the bytes first and decodes once.
"""

from __future__ import annotations

import re
from collections import Counter

PRETOKEN = re.compile(r"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""")

Pair = tuple[int, int]


def pretokenize(text: str) -> list[str]:
    """The pre-tokens of ``text`` in order; joined they give the text back."""
    return PRETOKEN.findall(text)


def count_pairs(words: dict[tuple[int, ...], int]) -> Counter:
    """words: each distinct pre-token as a tuple of ids -> how often it occurs. Returns how often each adjacent
    pair (a, b) occurs in the text: every position of every word, times the word's frequency."""
    counts: Counter = Counter()
    for word, freq in words.items():
        for pair in zip(word, word[1:]):
            counts[pair] += freq
    return counts


def merge_pair(word: tuple[int, ...], pair: Pair, new_id: int) -> tuple[int, ...]:
    """``word`` with every occurrence of ``pair`` replaced by ``new_id``, scanning left to right without overlap
    ((a, a) in a a a gives new_id a)."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def train_bpe(text: str, vocab_size: int) -> list[Pair]:
    """The merges of a byte-level BPE with ``vocab_size`` tokens (256 bytes + the merges) trained on ``text``:
    each time the most frequent pair, ties going to the smallest (a, b). Stops early when no pair is left."""
    if vocab_size < 256:
        raise ValueError(f"vocab_size {vocab_size}: a byte-level vocabulary holds the 256 bytes at least")
    words = dict(Counter(tuple(w.encode("utf-8")) for w in pretokenize(text)))
    merges: list[Pair] = []
    for new_id in range(256, vocab_size):
        counts = count_pairs(words)
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))  # most frequent, then smallest
        merges.append(best)
        words = {merge_pair(w, best, new_id): freq for w, freq in words.items()}
    return merges


def encode(text: str, merges: list[Pair]) -> list[int]:
    """Token ids of ``text``: each pre-token's bytes, merged by repeatedly taking the adjacent pair that was
    learned first (the lowest rank), which applies the merges in the order training found them."""
    rank = {pair: 256 + i for i, pair in enumerate(merges)}
    ids: list[int] = []
    for piece in pretokenize(text):
        word = tuple(piece.encode("utf-8"))
        while len(word) > 1:
            pair = min(zip(word, word[1:]), key=lambda p: rank.get(p, float("inf")))
            if pair not in rank:
                break
            word = merge_pair(word, pair, rank[pair])
        ids.extend(word)
    return ids


def token_bytes(merges: list[Pair]) -> list[bytes]:
    """The bytes of every token id: 0 … 255 the bytes themselves, 256 + i the two halves of merge i."""
    table = [bytes([b]) for b in range(256)]
    for a, b in merges:
        table.append(table[a] + table[b])
    return table


def decode(ids: list[int], merges: list[Pair]) -> str:
    """The text of token ``ids``: their bytes joined, then decoded as UTF-8 once (invalid bytes become U+FFFD)."""
    table = token_bytes(merges)
    return b"".join(table[i] for i in ids).decode("utf-8", errors="replace")
