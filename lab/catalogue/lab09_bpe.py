"""Lab 9, byte-level BPE: the mistakes students make in ``count_pairs``, ``merge_pair``, ``train_bpe``, ``encode``
and ``decode`` (llama_min/from_scratch/bpe.py), and the inputs that show them. Texts, merges and token ids are
stored as int64 tensors (texts as their UTF-8 bytes)."""

import torch

from ..mutations import m
from . import Case

BPE = "llama_min/from_scratch/bpe.py::"
COUNT, MERGE, TRAIN = BPE + "count_pairs", BPE + "merge_pair", BPE + "train_bpe"
ENCODE, DECODE = BPE + "encode", BPE + "decode"
TEXT = ("low lower lowest newer wider new newest\n  the café's naïve résumé—2024, 'tis 1,000 words... "
        "aaaa aaa aa\tend\n") * 2
UNSEEN = "the newest naïve wider café—lowest 99 aaaaa!"
BYTES = "the starting symbols are the 256 byte values of the UTF-8 encoding (w.encode('utf-8')), not characters"

MUTATIONS = [
    m("count_pairs_ignores_frequency", 9, COUNT, "each distinct word counted once",
      ("counts[pair] += freq", "counts[pair] += 1"), why="a pair occurs as often as the words holding it: add freq"),
    m("count_pairs_every_other", 9, COUNT, "only every other pair counted",
      ("zip(word, word[1:])", "zip(word[::2], word[1::2])"), why="count every adjacent pair, positions 0-1, 1-2, 2-3, …"),
    m("merge_pair_drops_last", 9, MERGE, "the last symbol is dropped",
      ("while i < len(word):", "while i < len(word) - 1:"),
      why="a symbol left over at the end of the word (no pair starts there) is kept"),
    m("merge_pair_first_only", 9, MERGE, "only the first occurrence merged",
      ("if i + 1 < len(word) and (word[i], word[i + 1]) == pair:",
       "if i + 1 < len(word) and (word[i], word[i + 1]) == pair and len(out) == i:"),
      why="every occurrence of the pair in the word becomes the new token"),
    m("train_ties_to_largest", 9, TRAIN, "ties go to the largest pair",
      ("min(counts, key=lambda pair: (-counts[pair], pair))", "max(counts, key=lambda pair: (counts[pair], pair))"),
      why="among the most frequent pairs take the smallest (a, b)"),
    m("train_least_frequent", 9, TRAIN, "the least frequent pair merged",
      ("(-counts[pair], pair)", "(counts[pair], pair)"), why="each merge takes the MOST frequent pair"),
    m("train_across_pretokens", 9, TRAIN, "merges cross pre-token boundaries",
      ("words = dict(Counter((tuple(w.encode('utf-8')) for w in pretokenize(text))))",
       "words = {tuple(text.encode('utf-8')): 1}"),
      why="count pairs inside each pre-token (pretokenize(text)), never across two"),
    m("train_characters", 9, TRAIN, "characters instead of bytes",
      ("tuple(w.encode('utf-8'))", "tuple(map(ord, w))"), why=BYTES),
    m("train_one_merge_too_many", 9, TRAIN, "vocab_size counts the 256 bytes",
      ("range(256, vocab_size)", "range(256, vocab_size + 1)"), why="vocab_size − 256 merges, ids 256 … vocab_size − 1"),
    m("train_vocab_is_merges", 9, TRAIN, "vocab_size counts the 256 bytes",
      ("range(256, vocab_size)", "range(256, 256 + vocab_size)"), why="vocab_size − 256 merges, ids 256 … vocab_size − 1"),
    m("train_not_applied", 9, TRAIN, "the merge is not applied to the words",
      ("words = {merge_pair(w, best, new_id): freq for w, freq in words.items()}", "pass"),
      why="after choosing a pair, replace it in every word (merge_pair) before counting again"),
    m("encode_latest_merge_first", 9, ENCODE, "merges applied in the wrong order",
      ("min(zip(word, word[1:]), key=lambda p: rank.get(p, float('inf')))",
       "max(zip(word, word[1:]), key=lambda p: rank.get(p, -1))"),
      why="repeatedly merge the pair learned FIRST (lowest rank), as training did"),
    m("encode_once", 9, ENCODE, "only one merge per pre-token", ("while len(word) > 1:", "if len(word) > 1:"),
      why="keep merging until no adjacent pair is a learned merge"),
    m("encode_characters", 9, ENCODE, "characters instead of bytes", ("tuple(piece.encode('utf-8'))", "tuple(map(ord, piece))"),
      why=BYTES),
    m("decode_per_token", 9, DECODE, "decoded token by token",
      ("b''.join((table[i] for i in ids)).decode('utf-8', errors='replace')",
       "''.join((table[i].decode('utf-8', errors='replace') for i in ids))"),
      why="a token may hold part of a character's UTF-8 bytes: join all the bytes, then decode once"),
    m("decode_latin1", 9, DECODE, "not decoded as UTF-8", ("decode('utf-8', errors='replace')", "decode('latin-1')"),
      why="the bytes are UTF-8: .decode('utf-8', errors='replace')"),
    m("decode_strict", 9, DECODE, "invalid bytes must become U+FFFD", ("decode('utf-8', errors='replace')", "decode('utf-8')"),
      why="a model can generate any byte sequence: decode with errors='replace'"),
]


def as_ids(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int64)


def text_of(t: torch.Tensor) -> str:
    return bytes(t.tolist()).decode("utf-8")


def text_tensor(text: str) -> torch.Tensor:
    return as_ids(text.encode("utf-8", errors="surrogatepass"))


def merges_of(t: torch.Tensor) -> list[tuple[int, int]]:
    return [tuple(row) for row in t.tolist()]


def as_merges(merges) -> torch.Tensor:
    return torch.tensor([list(p) for p in merges], dtype=torch.int64).reshape(-1, 2)


WORDS = {"low": 5, " lower": 2, " newest": 6, " widest": 3, "aaaa": 4, " café": 2}


def count_run(code, t):
    counts = code.count_pairs({tuple(w.encode("utf-8")): f for w, f in WORDS.items()})
    return as_ids(counts.get(tuple(p), 0) for p in t["pairs"].tolist())


MERGE_WORDS = [(b"aaa", (97, 97)), (b"aaaa", (97, 97)), (b"banana", (97, 110)), (b"xyz", (121, 122)), (b"ab", (97, 97))]


def merge_run(code, t):
    return tuple(as_ids(code.merge_pair(tuple(word), pair, 300)) for word, pair in MERGE_WORDS)


def cases():
    pairs = sorted({p for w in WORDS for p in zip(w.encode("utf-8"), w.encode("utf-8")[1:])})
    yield Case("count_pairs", {"pairs": as_merges(pairs)}, count_run, params={"words": WORDS},
               hint="every adjacent pair of every word, counted with the word's frequency")
    yield Case("merge_pair", {}, merge_run, params={"words": [[w.decode(), list(p)] for w, p in MERGE_WORDS], "new_id": 300},
               hint="left to right, every occurrence, without overlap: a a a with (a, a) gives 300 a")
    for name, vocab in (("small", 256 + 12), ("larger", 256 + 60)):
        yield Case(f"train_bpe.{name}", {"text": text_tensor(TEXT)},
                   lambda code, t, vocab=vocab: as_merges(code.train_bpe(text_of(t["text"]), vocab)),
                   params={"vocab_size": vocab},
                   hint="per pre-token bytes; each round the most frequent adjacent pair (ties: the smallest (a, b)) "
                        "becomes token 256 + (its round), replaced in every word")
    from llama_min.from_scratch.bpe import train_bpe  # the reference's merges, given to encode and decode
    merges = as_merges(train_bpe(TEXT, 256 + 60))
    for name, text in (("seen", TEXT), ("unseen", UNSEEN)):
        yield Case(f"encode.{name}", {"text": text_tensor(text), "merges": merges},
                   lambda code, t: as_ids(code.encode(text_of(t["text"]), merges_of(t["merges"]))),
                   hint="per pre-token: its UTF-8 bytes, then repeatedly merge the adjacent pair with the lowest "
                        "rank (learned first) until none is a merge")
    ids = as_ids(train_encode(merges, UNSEEN) + list("—".encode("utf-8")))  # and a dash as three byte tokens
    yield Case("decode.text", {"ids": ids, "merges": merges},
               lambda code, t: text_tensor(code.decode(t["ids"].tolist(), merges_of(t["merges"]))),
               hint="the tokens' bytes joined, then decoded as UTF-8 once")
    broken = as_ids([ord("o"), 0xC3, ord("k"), 0xFF])  # é's first byte alone, and a byte UTF-8 never uses
    yield Case("decode.invalid", {"ids": broken, "merges": merges},
               lambda code, t: text_tensor(code.decode(t["ids"].tolist(), merges_of(t["merges"]))),
               hint="invalid UTF-8 becomes U+FFFD (errors='replace')")


def train_encode(merges, text):
    from llama_min.from_scratch.bpe import encode
    return encode(text, merges_of(merges))
