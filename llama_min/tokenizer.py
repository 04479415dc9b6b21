"""The tokenizer: LLaMA's sentencepiece BPE model (Kudo & Richardson 2018; LLaMA section 2.1).

LLaMA's tokenizer is byte-pair encoding run by sentencepiece, with two choices the paper names: all
numbers are split into single digits, and unknown UTF-8 characters fall back to bytes (so no text is
ever out of vocabulary). Ids 0, 1, 2 are <unk>, <s> (bos), </s> (eos); there is no padding token (-1).
``Tokenizer.train`` makes a tokenizer with those same choices from text files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import sentencepiece as spm


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))

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

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(list(ids))

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    @staticmethod
    def train(files: Iterable[str | Path], out_path: str | Path, vocab_size: int,
              max_sentence_length: int = 16384, input_sentence_size: int = 2_000_000) -> "Tokenizer":
        """Train a LLaMA-style sentencepiece model on text files and write it to ``out_path``.

        BPE, digits split, byte fallback, no text normalisation (so decode(encode(s)) == s), the same
        special ids as LLaMA. Returns the loaded tokenizer.
        """
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        spm.SentencePieceTrainer.train(
            input=",".join(str(f) for f in files),
            model_prefix=str(out_path.with_suffix("")),
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
        written = out_path.with_suffix(".model")
        if written != out_path:
            written.replace(out_path)
        out_path.with_suffix(".vocab").unlink(missing_ok=True)
        return Tokenizer(out_path)
