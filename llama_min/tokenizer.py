"""The tokenizer: LLaMA's sentencepiece BPE model (Kudo & Richardson 2018; LLaMA section 2.1).

LLaMA's tokenizer is byte-pair encoding run by sentencepiece, with two choices the paper names: all
numbers are split into single digits, and unknown UTF-8 characters fall back to bytes (so no text is
ever out of vocabulary). Ids 0, 1, 2 are <unk>, <s> (bos), </s> (eos); there is no padding token (-1).
``Tokenizer.train`` makes a tokenizer with those same choices from text files, with one difference in
what it learns from, explained in its docstring: paragraphs with their newlines, not single lines.

Models that ship only a ``tokenizer.json`` (Hugging Face's format: Llama 3 and many small LLaMA-shaped
models use byte-level BPE) load through the optional ``tokenizers`` package behind the same interface
(``HFTokenizer`` below). ``load_tokenizer(path)`` picks the class from the file's name: use it wherever
the file may be either, as a checkpoint's may.
"""

from __future__ import annotations

import io
import json
import re
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from .cli import one_line
from .config import short


def load_tokenizer(path: str | Path) -> "Tokenizer":
    """The tokenizer in a file: a sentencepiece ``tokenizer.model`` (``Tokenizer``) or a Hugging Face
    ``tokenizer.json`` (``HFTokenizer``)."""
    return HFTokenizer(path) if Path(path).suffix == ".json" else Tokenizer(path)


class Tokenizer:
    def __init__(self, path: str | Path):
        path = self.path = existing_file(path)
        if type(self) is Tokenizer and path.suffix == ".json":
            raise ValueError(f"{path} is a Hugging Face tokenizer.json, not a sentencepiece model: load it with "
                             "llama_min.tokenizer.load_tokenizer(path) (or HFTokenizer(path))")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path} is not a sentencepiece tokenizer model ({one_line(e, 120)}); "
                             "copy the tokenizer.model the model was trained with") from None

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()  # -1 for LLaMA: batches are padded with any id and masked instead

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @cached_property
    def special_tokens(self) -> dict[str, int]:
        """Text -> id of the tokens a chat template writes by name: <s>, </s>, <unk> and any other control
        piece (sentencepiece never produces them from text)."""
        sp = self.sp
        return {sp.id_to_piece(i): i for i in range(sp.vocab_size()) if sp.is_control(i) or sp.is_unknown(i)}

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The special tokens by role, under transformers' names: the variables a chat template reads
        ({"bos_token": "<s>", "eos_token": "</s>", ...}); a role the tokenizer lacks is left out."""
        roles = {"bos_token": self.bos_id, "eos_token": self.eos_id, "unk_token": self.unk_id, "pad_token": self.pad_id}
        return {role: self.id_to_piece(i) for role, i in roles.items() if i >= 0}

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """Ids of a text in which a special token's text (``special_tokens``: "<s>", "<|im_end|>") stands for
        that token, as a rendered chat template writes them; nothing is added before or after. The text
        between special tokens is encoded piece by piece, as transformers does (with sentencepiece's
        dummy-prefix space before each piece, when the model adds one)."""
        specials = self.special_tokens
        if not specials:
            return self.sp.encode(text)
        names = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))  # longest match first
        ids: list[int] = []
        for i, part in enumerate(re.split(f"({names})", text)):  # text, token, text, token, ..., text
            ids += [specials[part]] if i % 2 else self.sp.encode(part) if part else []
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(list(ids))

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def text_bytes(self, i: int) -> int:
        """How many UTF-8 bytes of text token i stands for: a byte-fallback piece one, <s>, </s> and
        <unk> none, any other piece its own length with "▁" read as a space."""
        if self.sp.is_byte(i):
            return 1
        if self.sp.is_control(i) or self.sp.is_unknown(i):
            return 0
        return len(self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))

    # Bump when Tokenizer.train changes what it learns, so caches keyed on it (data.train_tokenizer) renew.
    TRAIN_RECIPE = 2

    @staticmethod
    def train(files: Iterable[str | Path], out_path: str | Path, vocab_size: int,
              max_sentence_length: int = 16384, input_sentence_size: int = 2_000_000,
              by_line: bool = False) -> "Tokenizer":
        """Train a LLaMA-style sentencepiece model on text files and write it to ``out_path``.

        BPE, digits split, byte fallback, no text normalisation (so decode(encode(s)) == s), the same
        special ids as LLaMA. Returns the loaded tokenizer.

        What sentencepiece learns from is made to match how the text is later encoded: whole documents,
        newlines included. Fed lines (its default, and how LLaMA's tokenizer was trained), it sees no
        newline and puts a "dummy prefix" space before every line, so it learns "▁What" where the
        encoded stream holds "\nWhat"; there every line's first word falls apart into short pieces.
        Here the sentences are paragraphs (up to a blank line) with their newlines, and no dummy
        prefix is added: on the Shakespeare held-out plays that means longer pieces and a lower held-out
        bits per byte for train.py's default (docs/results.md, "How the default got there").

        ``by_line=True`` is LLaMA's own recipe instead (lines, a dummy-prefix space before each); the
        word-task benchmark uses it (experiments/make_benchmark.py says why).

        The same text and settings give the same file, byte for byte: the model is handed over in memory,
        so no temporary path is recorded in it (caches are keyed on its bytes).
        """
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        source = (dict(input=",".join(str(f) for f in files)) if by_line  # sentencepiece's default input: lines
                  else dict(sentence_iterator=paragraphs(files, max_sentence_length), add_dummy_prefix=False))
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            **source,
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=1.0,
            split_digits=True,
            byte_fallback=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            max_sentence_length=max_sentence_length,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=2,
            minloglevel=2,  # quiet: warnings and errors only
        )
        out_path.write_bytes(model.getvalue())
        return Tokenizer(out_path)


def paragraphs(files: Iterable[str | Path], max_bytes: int) -> Iterator[str]:
    """The files' text cut after every blank line, newlines kept; a paragraph longer than ``max_bytes``
    (UTF-8) is cut at line ends, so that sentencepiece, which skips longer sentences, sees all of it."""
    for f in files:
        chunk, size = "", 0
        for line in Path(f).read_text(encoding="utf-8").splitlines(keepends=True):
            n = len(line.encode("utf-8"))
            if chunk and (chunk.endswith("\n\n") or size + n > max_bytes):
                yield chunk
                chunk, size = "", 0
            chunk, size = chunk + line, size + n
        if chunk:
            yield chunk


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json``, run by the optional ``tokenizers`` package.

    bos, eos and pad are named in the ``tokenizer_config.json`` beside it (Hugging Face's convention);
    without that file they are -1 (none), and encode adds nothing for them.
    """

    def __init__(self, path: str | Path):
        path = existing_file(path)
        try:
            from tokenizers import Tokenizer as TokenizersTokenizer
        except ImportError as e:
            raise ImportError(f"{path} needs the optional package `tokenizers`: pip install tokenizers") from e
        self.path = path
        try:
            self.tok = TokenizersTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises its own exception types for a malformed file
            raise ValueError(f"{path} is not a tokenizer.json the tokenizers package can read "
                             f"({one_line(e, 120)})") from None
        spec = json.loads(path.read_text(encoding="utf-8"))
        self._byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
        self._added_ids = {token["id"] for token in spec.get("added_tokens", [])}
        config_file = path.with_name("tokenizer_config.json")
        config = read_tokenizer_config(config_file) if config_file.is_file() else {}
        self._bos, self._eos, self._pad, self._unk = (self._special_id(config.get(k))
                                                      for k in ("bos_token", "eos_token", "pad_token", "unk_token"))

    def _special_id(self, token: str | dict | None) -> int:
        if isinstance(token, dict):  # {"content": "<s>", "lstrip": false, ...}
            token = token.get("content")
        i = self.tok.token_to_id(token) if token else None
        return -1 if i is None else i


    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def unk_id(self) -> int:
        return self._unk

    @cached_property
    def special_tokens(self) -> dict[str, int]:
        """Text -> id of the added tokens (matched whole wherever they occur in a text)."""
        return {t.content: i for i, t in self.tok.get_added_tokens_decoder().items()}

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids  # bos/eos are added here, as asked
        return [self.bos_id] * (bos and self.bos_id >= 0) + ids + [self.eos_id] * (eos and self.eos_id >= 0)

    def encode_with_special_tokens(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids  # tokenizers itself matches added tokens

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)  # as sentencepiece drops <s>, </s>

    def id_to_piece(self, i: int) -> str:
        return self.tok.id_to_token(i)

    def text_bytes(self, i: int) -> int:
        """As for sentencepiece. A byte-level BPE (GPT-2's scheme: its decoder is ByteLevel) writes every
        byte as one printable character, so a piece stands for as many bytes as it has characters; a
        special (added) token stands for no text."""
        piece = self.tok.id_to_token(i)
        if piece is None or i in self._added_ids:
            return 0
        if self._byte_level:
            return len(piece)
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):  # sentencepiece-style byte fallback
            return 1
        return len(piece.replace("\u2581", " ").encode("utf-8"))


def existing_file(path: str | Path) -> Path:
    """The path of a tokenizer file, or one error saying what is there instead."""
    path = Path(path)
    if path.is_dir():
        found = [n for n in ("tokenizer.model", "tokenizer.json") if (path / n).is_file()]
        raise ValueError(f"tokenizer {path} is a directory; pass the tokenizer file in it"
                         + (f" ({path / found[0]})" if found else " (tokenizer.model or tokenizer.json)"))
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    return path


def read_tokenizer_config(path: Path) -> dict:
    """tokenizer_config.json, whose special tokens (bos_token, ...) are each a string, an object with a
    string "content", or null; anything else is one error naming the file and the key."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not valid JSON ({one_line(e, 80)}); copy it again with its tokenizer.json") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object of tokenizer settings, found {short(config)}")
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        token = config.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        if token is not None and not isinstance(token, str):
            raise ValueError(f"{path}: {key} must be a token's text (or {{\"content\": text}}), got "
                             f"{short(config[key])}; fix that key or copy the file again")
    return config
