"""Reading a GGUF file (llama.cpp's format) of the ``llama`` architecture, via the optional ``gguf`` package.

A GGUF file is one file: key/value metadata (the hyper-parameters, the vocabulary) then the tensors,
each in its own ggml type (F32, F16, BF16, or a block quantisation such as Q8_0: blocks of 32 weights
sharing one scale). Tensors are dequantised one at a time with ``gguf.quants.dequantize``.

The q/k rows: llama.cpp runs LLaMA with its "normal" rotary mode, which rotates *adjacent* pairs, as
Meta's code and ours do. Its Hugging Face converter (convert_hf_to_gguf.py, ``LlamaModel.permute``)
therefore undoes Hugging Face's per-head permutation, and ``transformers``' GGUF loader re-applies it
(``_reverse_permute_weights``). So a GGUF llama stores wq and wk in Meta's order = ours: they are taken
as they are. tests/test_convert_gguf.py checks this against ``transformers`` reading the same file.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig, RopeScaling, short
from ..rope import RotaryEmbedding, scaled_frequencies
from .source import ConversionError, Source, one_line

# GGUF tensor name -> ours ({i} is the layer).
GGUF_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attention_norm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attention.wq.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attention.wk.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attention.wv.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attention.wo.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.feed_forward.w1.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.feed_forward.w2.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.feed_forward.w3.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
_PATTERNS = [(re.compile(re.escape(g).replace(re.escape("{i}"), r"(\d+)") + "$"), ours) for g, ours in GGUF_NAMES.items()]
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
TORCH_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}  # the rest dequantise to float32


def import_gguf():
    try:
        import gguf
    except ImportError as e:
        raise ConversionError("reading GGUF files needs the optional package `gguf`: pip install gguf") from e
    return gguf


def our_name(gguf_name: str) -> str:
    """GGUF name -> ours; an unknown name is returned as it is (and then reported as unexpected)."""
    for pattern, ours in _PATTERNS:
        m = pattern.match(gguf_name)
        if m:
            return ours.format(i=m.group(1)) if m.groups() else ours
    return gguf_name


def is_gguf_file(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


class GGUFSource(Source):
    format_name = "GGUF"

    def __init__(self, path: Path):
        gguf = import_gguf()
        self.path = path
        try:
            self.reader = gguf.GGUFReader(path)
        except Exception as e:  # numpy reshape / ValueError from a short or damaged file
            raise ConversionError(f"{path}: not a readable GGUF file (truncated or corrupt: {one_line(e)})") from e
        self.tensors = {}
        for t in self.reader.tensors:
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise ConversionError(f"{path}: tensor {t.name} is quantised as {t.tensor_type.name}, which this "
                                      f"converter does not dequantise; supported: {', '.join(SUPPORTED_TYPES)}")
            self.tensors[our_name(t.name)] = t
        # llama.cpp stores Llama 3's rope scaling as per-frequency divisors, not as weights of the model
        self.rope_factors = self.tensors.pop("rope_freqs.weight", None)
        self.shapes = {n: tuple(int(d) for d in reversed(t.shape.tolist())) for n, t in self.tensors.items()}
        embed = self.tensors.get("tok_embeddings.weight")
        self.dtype = TORCH_TYPES.get(embed.tensor_type.name, torch.float32) if embed is not None else torch.float32
        self.config = self._config()
        self.bos_id = self.field("tokenizer.ggml.bos_token_id", 1)
        self.eos_id = self.field("tokenizer.ggml.eos_token_id", 2)

    def field(self, key: str, default=None):
        field = self.reader.get_field(key)
        if field is None:
            return default
        value = field.contents()
        # float32 metadata (eps, rope base): keep its shortest decimal form, 1e-05 rather than 9.99999974e-06
        return float(str(np.float32(value))) if isinstance(value, float) else value

    def _config(self) -> ModelConfig:
        arch = self.field("general.architecture")
        if arch != "llama":
            raise ConversionError(f"{self.path}: architecture {arch!r} is not supported; llama_min reads 'llama' GGUF files")
        if self.field("llama.expert_count", 0):
            raise ConversionError(f"{self.path}: llama.expert_count: mixture-of-experts models are not supported")
        required = {"dim": "llama.embedding_length", "n_layers": "llama.block_count",
                    "n_heads": "llama.attention.head_count", "hidden_dim": "llama.feed_forward_length"}
        values = {k: self.field(key) for k, key in required.items()}
        missing = [required[k] for k, v in values.items() if v is None]
        if missing:
            raise ConversionError(f"{self.path}: metadata {missing} missing; a llama GGUF file carries them")
        bad = [f"{required[k]} = {short(v)}" for k, v in values.items() if type(v) is not int or v < 1]
        if bad:
            raise ConversionError(f"{self.path}: metadata {', '.join(bad)}; expected positive integers (a damaged "
                                  "or hand-edited file: convert the model again)")
        embed_rows = self.shapes.get("tok_embeddings.weight", (0,))[0]
        vocab = self.field("llama.vocab_size") or embed_rows or len(self.field("tokenizer.ggml.tokens", []))
        head_dim = values["dim"] // values["n_heads"]
        for key in ("llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.value_length"):
            if self.field(key, head_dim) != head_dim:
                raise ConversionError(f"{self.path}: {key} = {self.field(key)} but llama_min needs it equal to "
                                      f"embedding_length / head_count = {head_dim}")
        theta = self.field("llama.rope.freq_base", 10000.0)
        try:
            return ModelConfig(
                **values,
                n_kv_heads=self.field("llama.attention.head_count_kv") or values["n_heads"],
                vocab_size=vocab,
                norm_eps=self.field("llama.attention.layer_norm_rms_epsilon", 1e-5),
                rope_theta=theta,
                rope_scaling=self._rope_scaling(head_dim, theta),
                max_seq_len=self.field("llama.context_length", 2048),
                tie_embeddings="output.weight" not in self.tensors,  # llama.cpp then reuses token_embd
            )
        except ValueError as e:
            raise ConversionError(f"{self.path}: metadata gives an invalid config: {one_line(e)}") from e

    def _rope_scaling(self, head_dim: int, theta: float) -> RopeScaling | None:
        """linear: from the metadata. llama3: llama.cpp's converter writes the rule's result, θ_i divided
        by rope_freqs.weight[i]; the rule's parameters are recovered by recomputing it (factor = the largest
        divisor, Meta's constants 1 and 4, the original context from the metadata or Llama 3's 8192)."""
        kind = self.field("llama.rope.scaling.type", "none")
        if kind == "linear":
            return RopeScaling("linear", float(self.field("llama.rope.scaling.factor", 1.0)))
        if kind != "none":
            raise ConversionError(f"{self.path}: llama.rope.scaling.type {kind!r}: llama_min implements linear and "
                                  "Llama 3's rope scaling")
        if self.rope_factors is None:
            return None
        factors = torch.from_numpy(np.array(self.rope_factors.data, dtype=np.float32)).flatten()
        scaling = RopeScaling("llama3", float(factors.max()),
                              original_max_seq_len=int(self.field("llama.rope.scaling.original_context_length", 8192)))
        base = RotaryEmbedding(head_dim, theta).inv_freq(torch.device("cpu"))  # the unscaled θ_i
        if factors.shape != base.shape or not torch.allclose(base / scaled_frequencies(base, scaling), factors, rtol=1e-4):
            raise ConversionError(f"{self.path}: tensor rope_freqs.weight holds rotary frequency factors that do not "
                                  "follow Llama 3's rule; llama_min implements linear and Llama 3's rope scaling")
        return scaling

    @property
    def weights_file(self) -> Path:
        return self.path

    def read(self, name: str) -> torch.Tensor:
        gguf = import_gguf()
        t = self.tensors[name]
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type)  # (rows, cols) float32 (F16 stays float16)
        except Exception as e:
            raise ConversionError(f"{self.path}: tensor {t.name} ({t.tensor_type.name}) cannot be dequantised: {one_line(e)}") from e
        if not values.flags.writeable:  # F32 comes back as a view of the read-only memory map
            values = values.copy()
        return torch.from_numpy(values).reshape(self.shapes[name])

    def write_tokenizer(self, directory: Path) -> str | None:
        from .gguf_vocab import write_tokenizer_json

        return write_tokenizer_json(self, directory)

    def chat_template(self) -> str | None:
        return self.field("tokenizer.chat_template")  # written by llama.cpp's converter from the model's own

    def generation_config(self) -> dict | None:
        return None
