"""A GGUF file's vocabulary (``tokenizer.ggml.*`` metadata) rebuilt as a Hugging Face ``tokenizer.json``,
so llama_min's ``Tokenizer`` can run it (through the optional ``tokenizers`` package).

Two vocabularies occur in llama GGUF files:

- ``llama``: a sentencepiece BPE model (LLaMA 1/2): pieces with scores, "▁" for a space, a space added
  before the text, ``<0xNN>`` byte pieces for byte fallback. Sentencepiece's BPE merges, at each step,
  the adjacent pair whose merged piece has the highest score; a BPE model with the merge list
  "every (left, right) whose concatenation is a piece, ranked by that piece's score" encodes the same
  (the merge list is not stored, it is implied by the pieces).
- ``gpt2``: byte-level BPE (Llama 3 and most recent models): bytes mapped to printable characters,
  merges stored in ``tokenizer.ggml.merges``, text first split by a regular expression named by
  ``tokenizer.ggml.pre``.

Control tokens (<s>, </s>, <|begin_of_text|>, ...) become special added tokens, never split. The bos,
eos and pad tokens are named in a ``tokenizer_config.json`` beside the ``tokenizer.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # tokenizer.ggml.token_type

# Pre-tokenizer regular expressions by ``tokenizer.ggml.pre``: GPT-2's (Radford et al. 2019, section
# 2.2: split letters, digits, punctuation and spaces so merges never cross them) and Llama 3's, which
# also caps digit runs at three and keeps a leading non-letter with a word.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_PATTERNS = {None: GPT2_PATTERN, "default": GPT2_PATTERN, "gpt2": GPT2_PATTERN, "llama-bpe": LLAMA3_PATTERN}


def sentencepiece_bpe(tokens: list[str], scores: list[float], types: list[int], add_space_prefix: bool):
    """A ``tokenizers.Tokenizer`` equivalent to the sentencepiece BPE model with these pieces."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score, kind in zip(tokens, scores, types):
        if kind != NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-score, vocab[left], vocab[right], left, right))
    merges.sort()  # highest-scoring merged piece first; ties by the parts' ids, for a fixed order
    unk = next((t for t, k in zip(tokens, types) if k == UNKNOWN), None)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(left, right) for *_, left, right in merges],
                               unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    return tok


def byte_level_bpe(tokens: list[str], merges: list[str], pattern: str):
    """A ``tokenizers.Tokenizer`` for a GPT-2-style byte-level BPE vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def write_tokenizer_json(source, directory: Path) -> str | None:
    """Write tokenizer.json + tokenizer_config.json from a GGUFSource's metadata; return a note when the
    vocabulary cannot be converted (the weights are converted all the same)."""
    field = source.field
    model = field("tokenizer.ggml.model")
    if model is None:
        return f"{source.path} has no vocabulary (tokenizer.ggml.model); no tokenizer written"
    try:
        from tokenizers import AddedToken
    except ImportError:
        return ("tokenizer not written: converting the GGUF vocabulary to tokenizer.json needs the optional "
                "package `tokenizers` (pip install tokenizers), then convert again")
    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if model == "llama":
        tok = sentencepiece_bpe(tokens, field("tokenizer.ggml.scores") or [0.0] * len(tokens), types,
                                field("tokenizer.ggml.add_space_prefix", True))
    elif model == "gpt2":
        pre = field("tokenizer.ggml.pre")
        if pre not in PRE_PATTERNS:
            return (f"tokenizer not written: {source.path} uses pre-tokenizer {pre!r} (tokenizer.ggml.pre); "
                    f"known: {[p for p in PRE_PATTERNS if p]}")
        tok = byte_level_bpe(tokens, field("tokenizer.ggml.merges") or [], PRE_PATTERNS[pre])
    else:
        return f"tokenizer not written: {source.path} has a {model!r} vocabulary; known: 'llama', 'gpt2'"
    tok.add_tokens([AddedToken(t, special=k == CONTROL, normalized=False)
                    for t, k in zip(tokens, types) if k in (CONTROL, USER_DEFINED)])
    tok.save(str(directory / "tokenizer.json"))
    special = {f"{k}_token": field(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    config = {k.replace("padding", "pad"): tokens[i] for k, i in special.items() if i is not None and 0 <= i < len(tokens)}
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return None
