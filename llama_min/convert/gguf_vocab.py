"""A GGUF file's vocabulary (``tokenizer.ggml.*`` metadata) rebuilt as a Hugging Face ``tokenizer.json``,
so llama_min's ``Tokenizer`` and ``transformers`` can run it (through the optional ``tokenizers`` package).

Two vocabularies occur in llama GGUF files:

- ``llama``: a sentencepiece BPE model (LLaMA 1/2): pieces with scores, "▁" for a space, a space added
  before the text, ``<0xNN>`` byte pieces for byte fallback (rebuilt by hf_tokenizer.sentencepiece_bpe).
- ``gpt2``: byte-level BPE (Llama 3, SmolLM and most recent models): bytes mapped to printable
  characters, merges stored in ``tokenizer.ggml.merges``, text first split by the regular expressions of
  the family named by ``tokenizer.ggml.pre`` (pretokenizers.py).

Control tokens (<s>, </s>, <|im_end|>, ...) become special added tokens, never split. The bos, eos and pad
tokens are named in a ``tokenizer_config.json`` beside the ``tokenizer.json``.
"""

from __future__ import annotations

from pathlib import Path

from .hf_tokenizer import NORMAL, TOKENIZER_JSON, add_control_tokens, sentencepiece_bpe, tokenizer_config, write_config
from .pretokenizers import PRE_TOKENIZERS, PreTokenizer, pre_tokenizer


def byte_level_bpe(tokens: list[str], merges: list[str], rule: PreTokenizer):
    """A ``tokenizers.Tokenizer`` for a GPT-2-style byte-level BPE vocabulary split by ``rule``."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=rule.ignore_merges))
    tok.pre_tokenizer = pre_tokenizer(rule)
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
        import tokenizers  # noqa: F401  (only to say what is missing before any work)
    except ImportError:
        return ("tokenizer not written: converting the GGUF vocabulary to tokenizer.json needs the optional "
                "package `tokenizers` (pip install tokenizers), then convert again")
    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if model == "llama":
        tok = sentencepiece_bpe(tokens, field("tokenizer.ggml.scores") or [0.0] * len(tokens), types,
                                field("tokenizer.ggml.add_space_prefix", True))
        add_bos = field("tokenizer.ggml.add_bos_token", True)
    elif model == "gpt2":
        pre = field("tokenizer.ggml.pre")
        if pre not in PRE_TOKENIZERS:
            return (f"tokenizer not written: {source.path} uses pre-tokenizer {pre!r} (tokenizer.ggml.pre); "
                    f"known: {', '.join(p for p in PRE_TOKENIZERS if p)}")
        rule = PRE_TOKENIZERS[pre]
        tok = byte_level_bpe(tokens, field("tokenizer.ggml.merges") or [], rule)
        add_bos = field("tokenizer.ggml.add_bos_token", rule.add_bos)
    else:
        return f"tokenizer not written: {source.path} has a {model!r} vocabulary; known: 'llama', 'gpt2'"
    ids = {role: field(f"tokenizer.ggml.{key}_token_id") for role, key in
           (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding"))}
    ids = {role: i for role, i in ids.items() if i is not None and 0 <= i < len(tokens)}
    add_bos = bool(add_bos) and "bos_token" in ids
    add_control_tokens(tok, tokens, types, ids["bos_token"] if add_bos else None)
    tok.save(str(directory / TOKENIZER_JSON))
    special = {role: tokens[i] for role, i in ids.items()}
    write_config(directory, tokenizer_config(special, True, source.config.max_seq_len, add_bos))
    return None
