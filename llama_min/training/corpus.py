"""The pretraining corpus: text files in, one flat array of token ids per split out.

    documents (.txt or JSONL "text")  ->  tokenizer (trained once on the training split)
        ->  one flat array of token ids per split, cached on disk as a np.memmap
        (data.py then cuts random windows of seq_len + 1 tokens from it)

Every document is wrapped as <s> text </s> and the documents are concatenated, as in LLaMA's
pretraining (section 2.1: documents are packed into fixed-length sequences). The token files are
written once per (text, tokenizer) pair and then read through the page cache, so a 5 MB corpus costs
seconds the first time and nothing afterwards. Nothing here knows about models or devices.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

from ..cli import DataError, read_jsonl, read_text
from ..tokenizer import Tokenizer

TEXT_SUFFIXES = (".txt", ".jsonl")


# ---- what the run read: --resume says when the data changed ------------------------------------------


def data_fingerprint(data: str | Path) -> dict[str, list]:
    """{file name: [bytes, sha256]} of the data file, or of every file directly inside a data directory.
    Saved with each checkpoint; resuming compares it with the data found then (``data_changes``)."""
    data = Path(data)
    files = sorted(f for f in data.iterdir() if f.is_file() and not f.name.startswith(".")) if data.is_dir() else [data]
    fingerprint = {}
    for f in files:
        digest = hashlib.sha256()
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
        fingerprint[f.name] = [f.stat().st_size, digest.hexdigest()]
    return fingerprint


def data_changes(saved: dict[str, list], now: dict[str, list]) -> list[str]:
    """What differs between two ``data_fingerprint``s, one phrase per file ([] when nothing did)."""
    changes = [f"{name} is gone" for name in saved if name not in now]
    changes += [f"{name} is new" for name in now if name not in saved]
    for name in saved.keys() & now.keys():
        (old_size, old_hash), (size, digest) = saved[name], now[name]
        if old_hash != digest:
            changes.append(f"{name} changed ({old_size:,} -> {size:,} bytes)" if old_size != size
                           else f"{name} changed (same size, other content)")
    return sorted(changes)


# ---- reading documents ----------------------------------------------------------------------------


def read_documents(path: str | Path) -> list[str]:
    """A .txt file is one document; a .jsonl file holds one {"text": ...} record per line."""
    path = Path(path)
    if path.suffix not in TEXT_SUFFIXES:
        raise DataError(f"{path}: expected a .txt file or a .jsonl file with a \"text\" field per line")
    if path.suffix == ".txt":
        raw = read_text(path, "data file")
        return [raw] if raw.strip() else []
    docs = []
    for n, record in read_jsonl(path, 'one {"text": ...} object'):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{n}: expected an object with a string \"text\" field")
        if record["text"].strip():
            docs.append(record["text"])
    return docs


def split_documents(data: str | Path, val_fraction: float) -> tuple[list[str], list[str]]:
    """The training and held-out documents of ``data``.

    A directory holds train.txt|train.jsonl and val.txt|val.jsonl: the split is the user's (the shipped
    Shakespeare holds out whole plays). A single file is split here: the last ``val_fraction`` of its
    documents, or for a single .txt document the last ``val_fraction`` of its lines, is held out.
    """
    data = Path(data)
    if not data.exists():
        raise DataError(f"data path {data} does not exist; pass --data with a .txt/.jsonl file or a "
                        "directory holding train.txt and val.txt")
    if data.is_dir():
        found = {}
        for split in ("train", "val"):
            files = [data / f"{split}{s}" for s in TEXT_SUFFIXES if (data / f"{split}{s}").exists()]
            if len(files) != 1:
                raise DataError(f"data directory {data} must hold exactly one of {split}.txt, {split}.jsonl "
                                f"(found {len(files)})")
            found[split] = read_documents(files[0])
        train, val = found["train"], found["val"]
    else:
        docs = read_documents(data)
        if len(docs) == 1:  # one long text: hold out its last lines (its last words, when it is one line)
            lines = docs[0].splitlines(keepends=True)
            if len(lines) == 1:
                lines = re.split(r"(?<=\s)", docs[0])
            cut = len(lines) - max(1, round(len(lines) * val_fraction))
            docs = ["".join(lines[:cut]), "".join(lines[cut:])]
            cut = 1
        else:
            cut = len(docs) - max(1, round(len(docs) * val_fraction))
        train, val = docs[:cut], docs[cut:]
    for name, docs in (("training", train), ("held-out", val)):
        if not any(d.strip() for d in docs):
            raise DataError(f"the {name} split of {data} is empty; give it some text")
    return train, val


# ---- tokenizer and token cache -------------------------------------------------------------------


def text_digest(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def train_tokenizer(train_docs: list[str], cache_dir: Path, vocab_size: int) -> Tokenizer:
    """Train a LLaMA-style sentencepiece tokenizer on the training documents, once per (text, vocab)."""
    # The file keeps the name the checkpoint format expects, as it is copied into every checkpoint.
    path = (cache_dir / f"tokenizer-{text_digest(train_docs)}-v{vocab_size}-r{Tokenizer.TRAIN_RECIPE}"
            / "tokenizer.model")
    if path.exists():
        return Tokenizer(path)
    print(f"training a {vocab_size}-token tokenizer on {sum(map(len, train_docs)):,} characters (once; cached in "
          f"{path.parent})", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    corpus = path.with_suffix(f".{os.getpid()}.txt")
    tmp = path.with_suffix(f".{os.getpid()}.model")
    corpus.write_text("\n".join(train_docs), encoding="utf-8")
    try:
        Tokenizer.train([corpus], tmp, vocab_size)
    except RuntimeError as e:  # sentencepiece says why: too few pieces for the text's characters, or too few pieces in it
        reason = " ".join(str(e).split())
        needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", reason)
        if needed:
            raise DataError(f"a {vocab_size}-token tokenizer cannot hold the {needed[1]} distinct characters of "
                            f"{len(train_docs)} training document(s); pass --vocab_size {needed[1]} or more") from None
        raise DataError(f"training a {vocab_size}-token tokenizer failed ({reason[-160:]}); give more text or a "
                        "smaller --vocab_size") from None
    finally:
        corpus.unlink(missing_ok=True)
    tmp.replace(path)  # atomic: a half-written tokenizer is never picked up
    return Tokenizer(path)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenize_to_memmap(docs: list[str], tokenizer: Tokenizer, cache_dir: Path, split: str) -> np.memmap:
    """Token ids of ``<s> doc </s>`` for every document, concatenated; (N,) uint16/uint32, read-only."""
    digest = hashlib.sha256(tokenizer.path.read_bytes()).hexdigest()[:16]
    dtype = token_dtype(tokenizer.vocab_size)
    path = cache_dir / f"{split}-{text_digest(docs)}-{digest}.{dtype.name}.bin"
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        ids = [tokenizer.encode(d, bos=True, eos=True) for d in docs]
        flat = np.fromiter((i for doc in ids for i in doc), dtype=dtype, count=sum(map(len, ids)))
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        flat.tofile(tmp)
        tmp.replace(path)
    return np.memmap(path, dtype=dtype, mode="r")


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """(vocab_size,) int64: how many UTF-8 bytes of text each token stands for.

    Summed over the predicted tokens this is the length of the evaluated text, the denominator of
    bits per byte: a tokenizer-independent measure, since a model with a coarser vocabulary predicts
    fewer, longer tokens (``Tokenizer.text_bytes`` says how each kind of piece counts).
    """
    return np.array([tokenizer.text_bytes(i) for i in range(tokenizer.vocab_size)], dtype=np.int64)
