"""Inputs for the conversion tests, built here rather than downloaded, and the command line run in-process.

Each writer below spells out its format's names and layout a second time, independently of
llama_min/convert/, so a wrong table there does not pass the tests by agreeing with itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llama_min import Llama, ModelConfig
from scripts import run_script
from conftest import write_training_text


def run(*argv) -> tuple[int, str, str]:
    """weights_convert.py with these arguments: (exit status, stdout, stderr)."""
    done = run_script("weights_convert.py", *argv)
    return done.code, done.out, done.err


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


# ---- Meta: params.json + consolidated.NN.pth -----------------------------------------------------

# How Meta's model-parallel layers cut each weight (Megatron-LM section 3): column-parallel layers keep
# a block of output rows, row-parallel layers and the parallel embedding a block of input columns.
ROWS = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3", "output")
COLUMNS = ("attention.wo", "feed_forward.w2", "tok_embeddings")


def meta_split(name: str, tensor: torch.Tensor, n: int, i: int) -> torch.Tensor:
    """Shard i of n of a full tensor, as Meta's checkpoints store it."""
    stem = name.removesuffix(".weight")
    if tensor.dim() == 1:
        return tensor.clone()  # norms: every GPU holds all of it
    if stem.endswith(ROWS):
        step = tensor.shape[0] // n
        return tensor[i * step:(i + 1) * step].clone()
    if stem.endswith(COLUMNS):
        step = tensor.shape[1] // n
        return tensor[:, i * step:(i + 1) * step].clone()
    raise AssertionError(f"no split rule for {name}")


def write_meta(model: Llama, directory: Path, n_shards: int, vocab_in_params: bool = False) -> None:
    """Meta's release layout; params.json has vocab_size -1 (LLaMA-1) unless ``vocab_in_params``."""
    c = model.config
    directory.mkdir(parents=True)
    params = {"dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
              "multiple_of": c.multiple_of, "norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
              "vocab_size": c.vocab_size if vocab_in_params else -1}
    (directory / "params.json").write_text(json.dumps(params))
    state = model.state_dict()
    freqs = torch.randn(c.head_dim // 2)  # Meta's files carry this derived table; it must be dropped
    for i in range(n_shards):
        shard = {k: meta_split(k, v, n_shards, i) for k, v in state.items()}
        shard["rope.freqs"] = freqs
        torch.save(shard, directory / f"consolidated.{i:02d}.pth")


# ---- Hugging Face ------------------------------------------------------------------------------

def random_hf_model(n_kv_heads: int = 2, tie: bool = False, vocab: int = 97, seed: int = 0):
    """A transformers LlamaForCausalLM built and initialised by transformers itself; weights large
    enough (std 0.3) that attention is sharp, so a wrong head order changes the logits visibly."""
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_heads, vocab_size=vocab, max_position_embeddings=64, rms_norm_eps=1e-5,
        rope_theta=5000.0, tie_word_embeddings=tie, initializer_range=0.3)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def load_hf(directory: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


# ---- GGUF (llama.cpp) ------------------------------------------------------------------------------

# llama.cpp's tensor names for the llama architecture.
GGUF_LAYER = {"attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
              "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
              "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up"}
GGUF_TOP = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}


def gguf_name(name: str) -> str:
    stem = name.removesuffix(".weight")
    if stem.startswith("layers."):
        _, i, rest = stem.split(".", 2)
        return f"blk.{i}.{GGUF_LAYER[rest]}.weight"
    return f"{GGUF_TOP[stem]}.weight"


def write_gguf(model: Llama, path: Path, qtype: str = "F32", arch: str = "llama",
               add_vocab=None,
               raw_types: dict[str, str] | None = None, extra_tensors: dict | None = None) -> None:
    """A llama GGUF file written with the gguf package's own writer, q/k in llama.cpp's order (Meta's:
    adjacent rotary pairs, see llama.cpp's convert_hf_to_gguf.py). Matrices are stored as ``qtype``;
    norms stay F32, as llama.cpp keeps them. ``raw_types`` stores named tensors as zero bytes of a type;
    ``extra_tensors`` adds float32 arrays under their GGUF names (e.g. rope_freqs.weight)."""
    import gguf
    import numpy as np

    c = model.config
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_block_count(c.n_layers)
    w.add_vocab_size(c.vocab_size)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.head_dim)
    if add_vocab is not None:
        add_vocab(w)  # the tokenizer.ggml.* fields
    for name, values in (extra_tensors or {}).items():
        w.add_tensor(name, np.asarray(values, dtype=np.float32))
    state = model.state_dict()
    if c.tie_embeddings:
        del state["output.weight"]
    for name, tensor in state.items():
        values = tensor.detach().float().numpy()
        if name in (raw_types or {}):  # zero bytes of the right size: enough for a type to be refused
            qt = gguf.GGMLQuantizationType[raw_types[name]]
            block, size = gguf.GGML_QUANT_SIZES[qt]
            raw = np.zeros((values.shape[0], values.shape[1] // block * size), dtype=np.uint8)
            w.add_tensor(gguf_name(name), raw, raw_dtype=qt)
        elif tensor.dim() == 1 or qtype == "F32":
            w.add_tensor(gguf_name(name), values)
        elif qtype == "F16":
            w.add_tensor(gguf_name(name), values.astype(np.float16))
        else:
            qt = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(gguf_name(name), gguf.quants.quantize(values, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def q8_0_error_bound(w: torch.Tensor) -> torch.Tensor:
    """Largest error Q8_0 may make on each weight: blocks of 32 along a row share one scale
    d = max|w| / 127 (stored as float16); rounding to d·q errs by d/2, and the float16 scale by up
    to 127·d·2^-11 more."""
    rows, cols = w.shape
    d = w.reshape(rows, cols // 32, 32).abs().amax(-1, keepdim=True) / 127
    return (d * (0.5 + 127 * 2.0 ** -11) * (1 + 1e-6)).expand(rows, cols // 32, 32).reshape(rows, cols)


def config_of(directory: Path) -> ModelConfig:
    return ModelConfig.load(directory / "config.json")


# ---- tokenizers ------------------------------------------------------------------------------------

# Beyond write_training_text's words and numbers: contractions in both cases, words that change case,
# punctuation runs, code, newlines and non-Latin scripts, so that every pre-tokenizer rule has cuts to make.
MIXED_TEXT = ("I'm sure they'll say it's fine; DON'T you think? they'LLAMA it'SX\ncamelCase HTTPServer getURL x/y/z\n"
              "def f(x):\n    return x ** 2  # 12345 and 3.14\n\n\t你好，世界！ 한국어 Ελληνικά Ж café\n")


def train_byte_level_bpe(directory: Path, pre_tokenizer=None, special_tokens=("<|begin|>", "<|end|>"),
                         vocab_size: int = 400):
    """A GPT-2-style byte-level BPE trained by the `tokenizers` package on write_training_text's corpus and
    MIXED_TEXT; ``pre_tokenizer`` splits the text first (default: GPT-2's, ByteLevel with its regex)."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    write_training_text(directory / "corpus.txt")
    (directory / "mixed.txt").write_text(MIXED_TEXT * 20, encoding="utf-8")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(directory / "corpus.txt"), str(directory / "mixed.txt")], trainer)
    return tok


def byte_level_gguf_vocab(tok, pre: str, bos: str, eos: str, chat_template: str | None = None):
    """write_gguf's add_vocab for a byte-level BPE `tokenizers` object: the tokenizer.ggml.* fields llama.cpp's
    converter writes (its special tokens as control tokens, type 3; the rest normal, type 1)."""
    saved = json.loads(tok.to_str())
    vocab = saved["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in saved["model"]["merges"]]
    control = {t["content"] for t in saved["added_tokens"] if t["special"]}

    def add(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types([3 if t in control else 1 for t in tokens])
        w.add_token_merges(merges)
        w.add_bos_token_id(vocab[bos])
        w.add_eos_token_id(vocab[eos])
        if chat_template is not None:
            w.add_chat_template(chat_template)
    return add


# ---- chat templates, as Hugging Face models ship them -------------------------------------------------

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Llama 2-Chat's layout, with the checks such templates make (raise_exception) and bos/eos by variable.
INST = ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
        "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{% if loop.first and system %}"
        "{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
