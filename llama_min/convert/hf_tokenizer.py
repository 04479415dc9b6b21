"""The tokenizer files ``transformers`` loads: ``tokenizer.json`` (built with the optional ``tokenizers``
package) and ``tokenizer_config.json``, for a sentencepiece model and for a GGUF file's vocabulary.

Which class ``AutoTokenizer`` builds is the one ``tokenizer_config.json`` names. Beside a tokenizer.json we
name ``PreTrainedTokenizerFast`` (``TokenizersBackend`` in transformers 5): it runs the tokenizer.json as
written. ``LlamaTokenizer`` would not: transformers 5 rebuilds its pipeline from the vocabulary with a
Metaspace pre-tokenizer, which adds sentencepiece's dummy-prefix space only when the text does not already
start with a space, where sentencepiece always adds it (" a" is "▁▁a"). The bos token is added by the
tokenizer.json's post-processor: transformers 5 ignores ``add_bos_token`` when there is a tokenizer.json.

Without ``tokenizers`` only tokenizer_config.json is written, naming ``LlamaTokenizer``; transformers then
converts tokenizer.model itself, which needs the ``protobuf`` package.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..cli import one_line

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # GGUF's tokenizer.ggml.token_type codes
TOKENIZER_JSON, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"
# Text with what tokenizers get wrong first: runs of spaces, a leading space, tabs, newlines, digits,
# accents and a character outside any small vocabulary (byte fallback).
PROBE = "  Hello,  world!\n\n\tindented 2024 and 7.5 café naïve Ж 😀 end "


def sentencepiece_bpe(tokens: list[str], scores: list[float], types: list[int], add_space_prefix: bool):
    """A ``tokenizers.Tokenizer`` that encodes like the sentencepiece BPE model with these pieces.

    Sentencepiece's BPE merges, at each step, the adjacent pair whose merged piece has the highest score;
    a BPE model with the merge list "every (left, right) whose concatenation is a piece, ranked by that
    piece's score" encodes the same (the merges are not stored in the model, they follow from the pieces).
    Spaces become "▁", with one more before the text when the model adds a dummy prefix (LLaMA's does;
    ``Tokenizer.train``'s does not); unknown characters fall back to their UTF-8 bytes, <0xNN> pieces."""
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


def add_control_tokens(tok, tokens: list[str], types: list[int], bos_id: int | None) -> None:
    """Control and unknown tokens become special added tokens (matched whole in a text, never split, as a
    chat template writes them), user-defined ones plain added tokens; with ``bos_id``, encoding puts that
    token first."""
    from tokenizers import AddedToken, processors

    tok.add_tokens([AddedToken(t, special=k != USER_DEFINED, normalized=False)
                    for t, k in zip(tokens, types) if k in (UNKNOWN, CONTROL, USER_DEFINED)])
    if bos_id is not None:
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                           special_tokens=[(bos, bos_id)])


def tokenizer_config(special: dict[str, str], fast: bool, max_len: int | None, add_bos: bool,
                     add_prefix_space: bool | None = None) -> dict:
    """tokenizer_config.json: the class transformers builds, the special tokens by role (bos_token, ...),
    and the flags its sentencepiece conversion reads when there is no tokenizer.json."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast" if fast else "LlamaTokenizer", **special,
              "add_bos_token": add_bos, "add_eos_token": False, "clean_up_tokenization_spaces": False}
    if add_prefix_space is not None:  # for LlamaTokenizer; legacy: a dummy prefix after special tokens too
        config.update(add_prefix_space=add_prefix_space, legacy=True)
    if max_len:
        config["model_max_length"] = max_len
    return config


def write_config(directory: Path, config: dict) -> None:
    (directory / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


# ---- a sentencepiece model file --------------------------------------------------------------------

def sentencepiece_vocabulary(sp) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and GGUF token types of a ``SentencePieceProcessor``. (Sentencepiece's Python API
    does not say which pieces are user-defined: they count as normal, and the probe check catches them.)"""
    n = sp.vocab_size()
    types = [UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else BYTE if sp.is_byte(i)
             else UNUSED if sp.is_unused(i) else NORMAL for i in range(n)]
    return [sp.id_to_piece(i) for i in range(n)], [sp.get_score(i) for i in range(n)], types


def write_for_transformers(model_file: Path, directory: Path, max_len: int | None) -> str | None:
    """Write tokenizer.json and tokenizer_config.json for the sentencepiece model ``model_file`` into
    ``directory``, each unless it is there already; return a note when tokenizer.json could not be made."""
    from ..tokenizer import Tokenizer

    try:
        tokenizer = Tokenizer(model_file)
    except Exception as e:  # e.g. Llama 3's tokenizer.model, a tiktoken file
        return f"{model_file.name} is not a sentencepiece model ({one_line(e, 80)}); no tokenizer.json made"
    sp = tokenizer.sp
    tokens, scores, types = sentencepiece_vocabulary(sp)
    prefix = "".join(sp.encode("a", out_type=str)).startswith("▁")  # the model adds a dummy-prefix space
    note, fast = None, (directory / TOKENIZER_JSON).is_file()
    if not fast:
        try:
            tok = sentencepiece_bpe(tokens, scores, types, prefix)
        except ImportError:
            note = ("tokenizer.json not written (transformers then needs `protobuf` to read tokenizer.model): "
                    "building it needs the optional package `tokenizers`: pip install tokenizers, then convert again")
        else:
            add_control_tokens(tok, tokens, types, sp.bos_id() if sp.bos_id() >= 0 else None)
            if tok.encode(PROBE, add_special_tokens=False).ids == sp.encode(PROBE):
                tok.save(str(directory / TOKENIZER_JSON))
                fast = True
            else:  # a normalisation (NFKC, collapsed spaces) or user-defined pieces this rebuild lacks
                note = (f"tokenizer.json not written: {model_file.name} normalises its text in a way the rebuilt "
                        "tokenizer does not reproduce; transformers will convert it itself (with `protobuf`)")
    if not (directory / TOKENIZER_CONFIG).is_file():
        write_config(directory, tokenizer_config(tokenizer.special_tokens_map, fast, max_len, sp.bos_id() >= 0,
                                                 None if fast else prefix))
    return note
