"""GGUF byte-level vocabularies by pre-tokenizer name (tokenizer.ggml.pre), converted to tokenizer.json.

The reference for each name is a BPE run by the `tokenizers` package with the model family's own
pre-tokenizer, spelled here the way the family's tokenizer.json spells it (SmolLM: Digits then ByteLevel
with GPT-2's regex; Llama 3: one Split regex; ...), not with llama_min's table of regular expressions.
Its vocabulary is learnt from text that was not split at all, so it holds merges across every boundary
(" 2023", "e (", "'s c"): a rule that cuts less than the family's would use them and give other ids.
The vocabulary goes into a GGUF file as llama.cpp's converter writes it, weights_convert.py rebuilds a
tokenizer from the file, and both must give the same ids on text that exercises every rule.
"""

import json

import pytest

from llama_min import load_tokenizer

from conftest import random_model, tiny_config
from convert_helpers import CHATML, MIXED_TEXT, byte_level_gguf_vocab, run, train_byte_level_bpe, write_gguf
from scripts import run_script

tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("gguf")

TEXTS = ["the quick brown fox jumps over the lazy dog", "in 2023 and 31415926 or 1,000,000.50",
         "I'm sure they'll say it's fine; DON'T you think? We'VE", "camelCase HTTPServer getURL x/y/z //\n\n",
         "def f(x):\n    return x ** 2  # ok\n\n\n", "你好，世界！这是一个测试。 한국어 텍스트 Ελληνικά Ж", "Ж и 😀 ∑ ü café",
         "a  b   c\t\td\n\ne    ", "   indented", "Hello, World! (x=1; y=[2])", "", *MIXED_TEXT.splitlines()]

# The regular expressions in the families' tokenizer.json files.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
                r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def family_pre_tokenizer(name: str):
    """(pre-tokenizer, the BPE's ignore_merges) as the family's tokenizer.json has them."""
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    bytes_only = pt.ByteLevel(add_prefix_space=False, use_regex=False)
    gpt2 = pt.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's regex inside ByteLevel
    isolate = lambda pattern: pt.Split(Regex(pattern), behavior="isolated")  # noqa: E731
    return {
        "gpt2": (gpt2, False),
        "llama-bpe": (pt.Sequence([isolate(LLAMA3_SPLIT), bytes_only]), True),
        "smollm": (pt.Sequence([pt.Digits(individual_digits=True), gpt2]), False),
        "tekken": (pt.Sequence([isolate(TEKKEN_SPLIT), bytes_only]), True),
        "deepseek-coder": (pt.Sequence([isolate(r"[\r\n]"), isolate(r"\s?\p{L}+"), isolate(r"\s?\p{P}+"),
                                        isolate("[一-龥ࠀ-一가-퟿]+"), pt.Digits(individual_digits=True), bytes_only]),
                           False),
    }[name]


def family_tokenizer(tmp_path, family: str, specials=("<|begin|>", "<|end|>")):
    """A byte-level BPE learnt from unsplit lines, then run with ``family``'s pre-tokenizer. For families
    whose BPE ignores merges, the vocabulary also gets a word no merge reaches (" Ελληνικά"): a token of
    its own only when merges are ignored."""
    from tokenizers import pre_tokenizers

    bytes_only = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok = train_byte_level_bpe(tmp_path, bytes_only, specials, vocab_size=600)
    pre_tokenizer, ignore_merges = family_pre_tokenizer(family)
    if ignore_merges:
        saved = json.loads(tok.to_str())
        vocab = saved["model"]["vocab"]
        vocab[bytes_only.pre_tokenize_str(" Ελληνικά")[0][0]] = len(vocab)
        saved["model"]["ignore_merges"] = True
        tok = tokenizers.Tokenizer.from_str(json.dumps(saved))
    tok.pre_tokenizer = pre_tokenizer
    return tok


def gguf_with_vocab(tmp_path, pre: str, family: str | None = None, chat_template: str | None = None,
                    specials=("<|begin|>", "<|end|>")):
    """(path of a GGUF file holding a tiny random model and a BPE trained with ``family``'s pre-tokenizer
    under the name ``pre``, that BPE)."""
    original = family_tokenizer(tmp_path, family or pre, specials)
    model = random_model(tiny_config(vocab_size=original.get_vocab_size(), multiple_of=32, max_seq_len=128))
    write_gguf(model, tmp_path / "m.gguf", add_vocab=byte_level_gguf_vocab(original, pre, specials[0], specials[-1],
                                                                            chat_template))
    return tmp_path / "m.gguf", original


@pytest.mark.parametrize("pre, family", [("gpt2", None), ("llama-bpe", None), ("falcon3", "llama-bpe"),
                                         ("smollm", None), ("minerva-7b", "smollm"), ("tekken", None),
                                         ("deepseek-coder", None)])
def test_each_pre_tokenizer_encodes_like_the_family_tokenizer(tmp_path, pre, family):
    path, original = gguf_with_vocab(tmp_path, pre, family)
    code, out, err = run(path, tmp_path / "out")
    assert code == 0 and "note" not in out, f"{err}{out}"
    tok = load_tokenizer(tmp_path / "out" / "tokenizer.json")
    for text in TEXTS:
        got, expected = tok.encode(text, bos=False), original.encode(text).ids
        assert got == expected, (f"{pre}: {text!r} encodes as {[tok.id_to_piece(i) for i in got]}, the family's "
                                 f"tokenizer as {[original.id_to_token(i) for i in expected]}")
        assert tok.decode(got) == text


def test_the_rules_differ_where_the_families_differ(tmp_path):
    """The fixture can fail: its vocabulary gives other ids under each rule on a text with every kind of cut."""
    text = "\n".join(TEXTS)
    encodings = {family: family_tokenizer(tmp_path, family).encode(text).ids
                 for family in ("gpt2", "llama-bpe", "smollm", "tekken", "deepseek-coder")}
    assert len({tuple(ids) for ids in encodings.values()}) == len(encodings), "two rules split the text alike"


def test_unknown_pre_tokenizer_is_a_note_naming_the_known_ones(tmp_path):
    path, _ = gguf_with_vocab(tmp_path, "no-such-family", "gpt2")
    code, out, err = run(path, tmp_path / "out")
    assert code == 0, err
    assert "'no-such-family'" in out and "smollm" in out and "llama-bpe" in out, out
    assert not (tmp_path / "out" / "tokenizer.json").exists()


def test_smollm_gguf_with_a_chat_template_converts_and_talks(tmp_path):
    """A SmolLM2-like GGUF (pre-tokenizer smollm, ChatML template, <|im_end|> as eos): converted, generate.py
    answers with the carried template, and the Hugging Face export gives transformers the same ids."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("jinja2")
    path, original = gguf_with_vocab(tmp_path, "smollm", chat_template=CHATML,
                                     specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    assert run(path, tmp_path / "ours")[0] == 0
    assert (tmp_path / "ours" / "chat_template.jinja").read_text() == CHATML
    question = "the quick brown fox in 2023"
    rendered = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"  # ChatML, by hand
    done = run_script("generate.py", "--checkpoint", tmp_path / "ours", "--prompt", question,
                      "--temperature", "0", "--max_new_tokens", "6")
    assert done.code == 0, done.err
    assert f"[{len(original.encode(rendered).ids)} prompt tokens" in done.err, done.err

    code, _, err = run(path, tmp_path / "hf", "--to", "hf")
    assert code == 0, err
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = hf.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                 return_dict=False)
    assert ids == original.encode(rendered).ids, "transformers reads the export's tokenizer or template differently"
    assert hf.eos_token == "<|im_end|>"
