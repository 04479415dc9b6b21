"""How byte-level BPE vocabularies split text before merging, by the name a GGUF file gives in
``tokenizer.ggml.pre``.

A byte-level BPE tokenizer (GPT-2's scheme; Radford et al. 2019, section 2.2) first cuts the text into
pieces with regular expressions, so that merges never cross from letters into digits, punctuation or
spaces; each model family chose its own cut. A GGUF file does not store the expressions, only a name
(llama.cpp's converter recognises the family's tokenizer and writes the name). Here each name maps to
the expressions of the family's own ``tokenizer.json``, applied one after the other, each to the pieces the
previous one left (unmatched text stays a piece of its own), as llama.cpp (src/llama-vocab.cpp) and
``tokenizers``' Sequence of Split pre-tokenizers both do.

Names are llama.cpp's, for families whose models run as the ``llama`` architecture; the rule of each is
checked in tests/test_convert_tokenizer.py against a tokenizer built the way the family's tokenizer.json
builds it.
"""

from __future__ import annotations

from dataclasses import dataclass

# GPT-2's tokenizer.json (openai-community/gpt2: ByteLevel with use_regex): contractions, letters, digits
# and other symbols each with at most one leading space, and runs of spaces.
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama 3's tokenizer.json (meta-llama/Meta-Llama-3-8B): contractions in any case, a letter run keeps one
# leading non-letter, digit runs are cut every three, newlines go with the spaces before them.
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Mistral NeMo's "tekken" tokenizer.json (mistralai/Mistral-Nemo-Base-2407): Llama 3's, but a word is cut
# where lower case turns to upper case ("camelCase" is two pieces), single digits, and "/" and newlines
# stay with a run of symbols.
TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# CJK ideographs (U+4E00-U+9FA5), the blocks from U+0800 up to them, and Hangul (U+AC00-U+D7FF).
DEEPSEEK_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"


@dataclass(frozen=True)
class PreTokenizer:
    patterns: tuple[str, ...]  # applied in order, each to the pieces the previous one left
    source: str  # where the rule comes from
    ignore_merges: bool = False  # a piece that is itself in the vocabulary is one token, whatever the merges
    add_bos: bool = False  # llama.cpp's default for add_bos_token when the file does not say


GPT2_RULE = PreTokenizer((GPT2,), "GPT-2's tokenizer.json")
LLAMA3_RULE = PreTokenizer((LLAMA3,), "Llama 3's tokenizer.json (its BPE has ignore_merges)", ignore_merges=True,
                           add_bos=True)
SMOLLM_RULE = PreTokenizer((r"\p{N}", GPT2), "SmolLM's tokenizer.json: every digit alone (Digits), then GPT-2's")
TEKKEN_RULE = PreTokenizer((TEKKEN,), "Mistral NeMo's tekken tokenizer.json", ignore_merges=True, add_bos=True)
DEEPSEEK_CODER_RULE = PreTokenizer(
    (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", DEEPSEEK_CJK, r"\p{N}"),
    "DeepSeek Coder's tokenizer.json (deepseek-ai/deepseek-coder-6.7b-base), as llama.cpp lists it: "
    "newlines, letter runs, punctuation runs, CJK runs, single digits")

# tokenizer.ggml.pre -> rule. llama.cpp (src/llama-vocab.cpp) gives the same rule to the names grouped here.
PRE_TOKENIZERS = {
    None: GPT2_RULE, "default": GPT2_RULE, "gpt2": GPT2_RULE, "gpt-2": GPT2_RULE,
    "llama-bpe": LLAMA3_RULE, "llama3": LLAMA3_RULE, "llama-v3": LLAMA3_RULE, "smaug-bpe": LLAMA3_RULE,
    "falcon3": LLAMA3_RULE,
    "smollm": SMOLLM_RULE, "minerva-7b": SMOLLM_RULE,
    "tekken": TEKKEN_RULE,
    "deepseek-coder": DEEPSEEK_CODER_RULE,
}


def pre_tokenizer(rule: PreTokenizer):
    """The rule as a ``tokenizers`` pre-tokenizer: the splits, then the bytes mapped to printable
    characters (the byte-level alphabet the vocabulary is written in)."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(p), behavior="isolated") for p in rule.patterns]
                                   + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
