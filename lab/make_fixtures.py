"""Write the graders' fixtures: inputs, the reference code's outputs, and the outputs of typical wrong versions.

    python -m lab.make_fixtures [--out lab/fixtures]

For lab N it writes ``labNN.safetensors`` (tensors under ``CASE.FIELD``: the inputs, ``expected``, and
``variant.NAME`` for each wrong version) and ``labNN.json`` (per case: parameters, tolerance, and the mistake
each variant makes, in words a student can act on). The expected outputs come from this repository's code;
each wrong version is computed here, independently (by feeding the reference changed inputs, or by writing
the wrong formula out), and must differ from the expected output beyond the tolerance, or this script stops.
Every draw is seeded: the files are the same at every run on the same PyTorch.

This script and the wrong versions it writes are for instructors; student versions do not contain it.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import llama_min.attention as attention_module
from llama_min.attention import Attention, attention_mask, causal_mask, plain_attention, sdpa_attention
from llama_min.config import ModelConfig
from llama_min.feedforward import FeedForward
from llama_min.generation import choose_next, filter_top_k, filter_top_p
from llama_min.kv_cache import KVCache
from llama_min.peft.adapter import AdapterPrompt
from llama_min.peft.lora import LoRALinear
from llama_min.rmsnorm import RMSNorm
from llama_min.rope import RotaryEmbedding, apply_rotary
from llama_min.training.config import TrainConfig
from llama_min.training.data import windows
from llama_min.training.optim import decays, get_lr

from .fixtures_lab10 import lab10
from .fixtures_lab11 import lab11
from .graders.check import matches
from .manifest import LAB_DIR

EXACT_BF16 = {"exact_fraction": 0.01, "rtol": 2 ** -7}  # bfloat16: one rounding step, in at most 1% of entries


class Writer:
    """Collects one lab's cases and writes its two files."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.cases: dict[str, dict] = {}

    def case(self, name: str, inputs: dict, expected, **meta) -> "CaseWriter":
        """meta: params (dict), tol (dict), hint, dtype_cause, shape_causes."""
        self.cases[name] = {k: v for k, v in meta.items() if v is not None}
        for field, value in inputs.items():
            self._put(f"{name}.{field}", value)
        self._put(f"{name}.expected", expected)
        return CaseWriter(self, name, expected)

    def _put(self, key: str, value) -> None:
        if isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                self._put(f"{key}.{i}", v)
        else:
            self.tensors[key] = value.detach().contiguous().clone()

    def save(self, stem: Path) -> None:
        save_file(self.tensors, f"{stem}.safetensors")
        Path(f"{stem}.json").write_text(json.dumps({"cases": self.cases}, indent=1, ensure_ascii=False) + "\n",
                                        encoding="utf-8")


class CaseWriter:
    def __init__(self, writer: Writer, name: str, expected):
        self.writer, self.name = writer, name
        self.expected = tuple(expected) if isinstance(expected, (tuple, list)) else (expected,)

    def mistake(self, variant: str, output, cause: str) -> "CaseWriter":
        """Store a wrong version's output and what it gets wrong; it must be distinguishable."""
        output = tuple(output) if isinstance(output, (tuple, list)) else (output,)
        tol = self.writer.cases[self.name].get("tol", {})
        if all(matches(o, e, tol) for o, e in zip(output, self.expected)):
            raise AssertionError(f"{self.name}: variant {variant!r} gives the reference's output; "
                                 "it cannot be told apart")
        self.writer._put(f"{self.name}.variant.{variant}", output if len(output) > 1 else output[0])
        self.writer.cases[self.name].setdefault("causes", {})[variant] = cause
        return self


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g: torch.Generator, *shape, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * std


# ---- lab 1: RMSNorm ----------------------------------------------------------------------------------------

NO_EPS = ("RMSNorm without eps: eps goes under the square root, x / sqrt(mean(x²) + eps); without it an input "
          "with a tiny or zero root mean square blows up or gives NaN")


def rms_variants(c: CaseWriter, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    x32 = x.float()
    ms = x32.pow(2).mean(-1, keepdim=True)
    c.mistake("no_eps", x32 * torch.rsqrt(ms) * weight, NO_EPS)
    c.mistake("eps_outside", x32 / (ms.sqrt() + eps) * weight,
              "eps added outside the square root: the denominator is sqrt(mean(x²) + eps), not sqrt(mean(x²)) + eps")
    c.mistake("sum", x32 * torch.rsqrt(x32.pow(2).sum(-1, keepdim=True) + eps) * weight,
              "sum of squares instead of the mean: RMS is sqrt(mean(x²)), the mean over the last axis (dim)")
    c.mistake("wrong_axis", x32 * torch.rsqrt(x32.pow(2).mean(0, keepdim=True) + eps) * weight,
              "mean over the wrong axis: the statistics are per vector, over the last axis (dim=-1, keepdim=True)")
    centred = x32 - x32.mean(-1, keepdim=True)
    c.mistake("layernorm", centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps) * weight,
              "subtracts the mean (that is LayerNorm): RMSNorm only rescales, x / RMS(x), no centring")
    c.mistake("sqrt", x32 * torch.sqrt(ms + eps) * weight,
              "multiplies by the root mean square instead of dividing by it (rsqrt, or 1 / sqrt)")
    c.mistake("no_gain", x32 * torch.rsqrt(ms + eps),
              "the gain self.weight is not applied: y = x / RMS(x) · g")


def lab01(w: Writer) -> None:
    g = generator(1)
    dim, eps = 64, 1e-5
    x = randn(g, 3, 5, dim)
    x[0, 1] *= 1e-3  # a tiny root mean square: where eps matters
    x[1, 2] = 0.0  # an all-zero vector: NaN without eps
    weight = torch.rand(dim, generator=g) + 0.5
    norm = RMSNorm(dim, eps)
    norm.weight.data.copy_(weight)
    c = w.case("forward.float32", {"x": x, "weight": weight}, norm(x), params={"eps": eps},
               hint="y = x / sqrt(mean(x², last axis) + eps) · weight")
    rms_variants(c, x, weight, eps)

    eps = 0.1  # a large eps: a hard-coded one shows
    x = randn(g, 2, 4, dim, std=0.05)
    norm = RMSNorm(dim, eps)
    norm.weight.data.copy_(weight)
    c = w.case("forward.eps", {"x": x, "weight": weight}, norm(x), params={"eps": eps},
               hint="use the module's own eps (self.eps), under the square root")
    x32, ms = x.float(), x.float().pow(2).mean(-1, keepdim=True)
    for fixed in (1e-5, 1e-6):
        c.mistake(f"fixed_eps_{fixed:g}", x32 * torch.rsqrt(ms + fixed) * weight,
                  f"eps is hard-coded ({fixed:g}); use self.eps: it comes from the checkpoint's config "
                  "(1e-6 in LLaMA-1, 1e-5 in Llama 2)")
    c.mistake("no_eps", x32 * torch.rsqrt(ms) * weight, NO_EPS)

    dim = 256
    x = randn(g, 3, 4, dim, std=3.0).bfloat16()
    weight = (torch.rand(dim, generator=g) + 0.5).bfloat16()
    norm = RMSNorm(dim, 1e-5).bfloat16()
    norm.weight.data.copy_(weight)
    c = w.case("forward.bfloat16", {"x": x, "weight": weight}, norm(x), params={"eps": 1e-5}, tol=EXACT_BF16,
               dtype_cause="Normalise in float32, cast back to x's dtype, then multiply by the gain.")
    c.mistake("computed_in_bf16", x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight,
              "computed in bfloat16: mean(x²) over many bfloat16 values loses precision; upcast x to float32 "
              "for the statistics (x.float()) and cast back afterwards")
    x32 = x.float()
    c.mistake("gain_before_cast", (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.float())
              .bfloat16(), "the gain is applied before casting back: LLaMA casts the normalised x back to x's "
              "dtype first, then multiplies by the gain (normed.type_as(x) * weight)")


# ---- lab 2: SwiGLU -----------------------------------------------------------------------------------------

def lab02(w: Writer) -> None:
    g = generator(2)
    dim, hidden = 32, 48
    w1, w3 = randn(g, hidden, dim, std=1.5 / dim ** 0.5), randn(g, hidden, dim, std=1.5 / dim ** 0.5)
    w2 = randn(g, dim, hidden, std=1.5 / hidden ** 0.5)
    x = randn(g, 2, 5, dim)
    ff = FeedForward(dim, hidden)
    for name, t in (("w1", w1), ("w2", w2), ("w3", w3)):
        getattr(ff, name).weight.data.copy_(t)
    a, b = x @ w1.T, x @ w3.T  # the gated branch and the linear branch
    c = w.case("forward", {"x": x, "w1": w1, "w2": w2, "w3": w3}, ff(x), params={"dim": dim, "hidden": hidden},
               hint="FFN(x) = w2(silu(w1 x) * w3 x)")
    c.mistake("silu_on_w3", (a * F.silu(b)) @ w2.T,
              "SiLU on the wrong branch: the gate is silu(w1 x); w3 x is the linear branch")
    c.mistake("relu", (F.relu(a) * b) @ w2.T, "ReLU instead of SiLU (Swish-1): silu(z) = z · sigmoid(z)")
    c.mistake("gelu", (F.gelu(a) * b) @ w2.T, "GELU instead of SiLU (that would be GEGLU): silu(z) = z · sigmoid(z)")
    c.mistake("sigmoid", (torch.sigmoid(a) * b) @ w2.T,
              "sigmoid instead of SiLU (that is the original GLU): silu(z) = z · sigmoid(z)")
    c.mistake("no_gate", F.silu(a) @ w2.T,
              "the linear branch w3 x is missing: SwiGLU multiplies silu(w1 x) element-wise by w3 x")
    c.mistake("added", (F.silu(a) + b) @ w2.T, "the branches are added; SwiGLU multiplies them element-wise")
    c.mistake("silu_of_product", F.silu(a * b) @ w2.T,
              "SiLU applied to the product; it applies to the w1 branch only: silu(w1 x) * (w3 x)")


# ---- lab 3: RoPE -------------------------------------------------------------------------------------------

I_OVER_D = ("θ^(−i/d) instead of θ^(−2i/d): the frequencies are θ_i = theta^(−2i/d) for i = 0 … d/2 − 1 "
            "(torch.arange(0, d, 2) / d)")
POSITIVE = "the exponent has the wrong sign: θ_i = theta^(−2i/d) shrinks with i (the first pair turns fastest)"
HALVES = ("these are the outputs of rotating halves (GPT-NeoX / Hugging Face style, pairs (i, i + d/2)); "
          "LLaMA rotates adjacent pairs (2i, 2i+1)")
SIGN = ("rotation in the wrong direction (by −mθ): (a, b) -> (a cos − b sin, a sin + b cos) rotates by +mθ")
SWAPPED = "cos and sin swapped"


def rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The GPT-NeoX convention: feature i pairs with i + d/2 (a wrong version here)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


def lab03(w: Writer) -> None:
    g = generator(3)
    for d, theta in ((16, 10000.0), (10, 500000.0)):
        rope = RotaryEmbedding(d, theta)
        c = w.case(f"inv_freq.d{d}", {}, rope.inv_freq(torch.device("cpu")), params={"head_dim": d, "theta": theta},
                   hint="θ_i = theta^(−2i/d), i = 0 … d/2 − 1, float32",
                   dtype_cause="The frequencies are float32 (torch.arange(...).float()).",
                   shape_causes={str([d]): "one frequency per feature; RoPE has one per PAIR of features: d/2 of them"})
        i = torch.arange(d // 2).float()
        c.mistake("i_over_d", theta ** (-i / d), I_OVER_D)
        c.mistake("positive", theta ** (2 * i / d), POSITIVE)

    rope = RotaryEmbedding(16, 10000.0)
    batched = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]])  # row 1 left-padded by 2
    for name, positions in (("positions", torch.arange(7)), ("batched", batched)):
        cos, sin = rope(positions)
        c = w.case(f"forward.{name}", {"positions": positions}, (cos, sin), params={"head_dim": 16, "theta": 10000.0},
                   hint="angles = positions[..., None] · θ (outer product), then their cos and sin, float32",
                   shape_causes={str([8, positions.shape[-1]]): "angles laid out (d/2, T); they are (T, d/2): "
                                 "positions[..., None] * θ"})
        c.mistake("swapped", (sin, cos), SWAPPED)
        c.mistake("from_one", rope(positions + 1), "positions counted from 1; the first token has position 0")
        wrong = positions.float()[..., None] * 10000.0 ** (-torch.arange(8).float() / 16)
        c.mistake("i_over_d", (wrong.cos(), wrong.sin()), I_OVER_D + " (in inv_freq)")

    x = randn(g, 2, 6, 4, 16)
    angles = (torch.rand(6, 8, generator=g) * 2 - 1) * math.pi  # every pair turns by a sizeable angle
    cos, sin = angles.cos(), angles.sin()
    c = w.case("apply_rotary.float32", {"x": x, "cos": cos, "sin": sin}, apply_rotary(x, cos, sin),
               hint="(x[2i], x[2i+1]) -> (x[2i] cos − x[2i+1] sin, x[2i] sin + x[2i+1] cos), the same angles for "
                    "every head",
               dtype_cause="Return x's dtype.")
    c.mistake("halves", rotate_halves(x, cos, sin), HALVES)
    c.mistake("sign", apply_rotary(x, cos, -sin), SIGN)
    c.mistake("swapped", apply_rotary(x, sin, cos), SWAPPED)

    angles = (torch.rand(2, 6, 8, generator=g) * 2 - 1) * math.pi  # a different position per row (left padding)
    cos, sin = angles.cos(), angles.sin()
    c = w.case("apply_rotary.batched", {"x": x, "cos": cos, "sin": sin}, apply_rotary(x, cos, sin),
               hint="cos, sin (B, T, d/2) broadcast over the heads axis: (B, T, 1, d/2)")
    c.mistake("halves", rotate_halves(x, cos, sin), HALVES)
    c.mistake("sign", apply_rotary(x, cos, -sin), SIGN)
    c.mistake("first_row", apply_rotary(x, cos[0], sin[0]), "row 0's angles are used for every row of the batch")

    x = randn(g, 2, 6, 4, 64).bfloat16()
    angles = (torch.rand(6, 32, generator=g) * 2 - 1) * math.pi
    cos, sin = angles.cos(), angles.sin()
    c = w.case("apply_rotary.bfloat16", {"x": x, "cos": cos, "sin": sin}, apply_rotary(x, cos, sin), tol=EXACT_BF16,
               dtype_cause="Rotate in float32, then cast back to x's dtype (x.dtype).")
    pairs = x.unflatten(-1, (-1, 2))
    cb, sb = cos.bfloat16().unsqueeze(-2), sin.bfloat16().unsqueeze(-2)
    c.mistake("computed_in_bf16", torch.stack((pairs[..., 0] * cb - pairs[..., 1] * sb,
                                               pairs[..., 0] * sb + pairs[..., 1] * cb), -1).flatten(-2),
              "rotated in bfloat16: compute the rotation in float32 (x.float()) and cast back at the end")
    c.mistake("halves", rotate_halves(x, cos, sin), HALVES)


# ---- lab 4: attention --------------------------------------------------------------------------------------

SCALE_D = "scores divided by d instead of √d (Vaswani et al. eq. 1: q kᵀ / sqrt(d_k))"
NO_SCALE = "scores not scaled: divide q kᵀ by sqrt(d), d the head dimension"
REPEAT = ("GQA with repeat instead of repeat_interleave: query head h reads kv head h // (H / H_kv), so each kv "
          "head is repeated for consecutive query heads (k.repeat_interleave(groups, dim=1))")
SOFTMAX_AXIS = "softmax over the wrong axis: each query's weights sum to 1 over the keys (dim=-1)"
AFTER_SOFTMAX = ("mask applied after the softmax: masked scores must be −inf before it, so that the visible "
                 "weights still sum to 1")
NO_MASK = "no causal mask: a token must not see later tokens (mask None means the causal mask)"
TOP_LEFT = ("causal triangle aligned top-left: with fewer queries than keys the T queries are the LAST T of S "
            "positions, so query i sees keys j <= i + S − T (bottom-right)")
MASK_FUTURE = "mask off by one: each query also sees the next token (keys j <= i + S − T only)"
MASK_NO_SELF = "mask off by one: each query must see its own position too (j <= i + S − T, not <)"
IGNORES_MASK = "the mask argument is ignored: when a mask is given (left padding), use it instead of the causal one"


def attend(q, k, v, mask, *, scale: str = "sqrt", rep: str = "interleave", softmax_dim: int = -1,
           mask_at: str = "before", diagonal: int | None = None):
    """Attention written out with switches for the wrong versions. mask: bool, or None for causal with
    ``diagonal`` (S − T when None)."""
    groups = q.shape[1] // k.shape[1]
    if rep == "interleave":
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    else:
        k, v = k.repeat(1, groups, 1, 1), v.repeat(1, groups, 1, 1)
    d = q.shape[-1]
    scores = q @ k.transpose(-2, -1) / {"sqrt": math.sqrt(d), "d": d, "none": 1.0}[scale]
    T, S = scores.shape[-2:]
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool).tril(S - T if diagonal is None else diagonal)
    if mask_at == "before":
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = F.softmax(scores, dim=softmax_dim)
    if mask_at == "after":
        weights = weights.masked_fill(~mask, 0.0)
    return weights @ v


def attention_mistakes(c: CaseWriter, q, k, v, mask, *, sdpa: bool = False) -> None:
    T, S = q.shape[2], k.shape[2]
    c.mistake("repeat", attend(q, k, v, mask, rep="tile"), REPEAT)
    if not sdpa:
        c.mistake("scale_d", attend(q, k, v, mask, scale="d"), SCALE_D)
        c.mistake("no_scale", attend(q, k, v, mask, scale="none"), NO_SCALE)
        c.mistake("softmax_axis", attend(q, k, v, mask, softmax_dim=-2), SOFTMAX_AXIS)
        c.mistake("after_softmax", attend(q, k, v, mask, mask_at="after"), AFTER_SOFTMAX)
        causal = torch.ones(T, S, dtype=torch.bool).tril(S - T) if mask is None else mask
        c.mistake("inverted", attend(q, k, v, ~causal),
                  "the mask is used inverted: fill −inf where the mask is False (masked_fill(~mask, −inf))")
    if mask is None:
        c.mistake("no_mask", attend(q, k, v, torch.ones(T, S, dtype=torch.bool)), NO_MASK)
        c.mistake("future", attend(q, k, v, None, diagonal=S - T + 1), MASK_FUTURE)
        if not sdpa:
            c.mistake("no_self", attend(q, k, v, None, diagonal=S - T - 1), MASK_NO_SELF)
        if T != S:
            c.mistake("top_left", attend(q, k, v, None, diagonal=0),
                      TOP_LEFT + (" (is_causal=True is top-left: pass causal_mask(T, S) instead)" if sdpa else ""))
    else:
        c.mistake("ignores_mask", attend(q, k, v, None), IGNORES_MASK)


def mask_cases(w: Writer) -> None:
    for T, S in ((5, 5), (3, 7), (1, 6)):
        c = w.case(f"causal_mask.{T}x{S}", {}, causal_mask(T, S), params={"T": T, "S": S},
                   hint="query i (the last T of S positions) sees key j when j <= i + S − T")
        full = torch.ones(T, S, dtype=torch.bool)
        if T != S:
            c.mistake("top_left", full.tril(0), TOP_LEFT)
        if S - T + 1 < S:
            c.mistake("future", full.tril(S - T + 1), MASK_FUTURE)
        c.mistake("no_self", full.tril(S - T - 1), MASK_NO_SELF)
        c.mistake("inverted", ~causal_mask(T, S), "the mask is inverted: True means 'may attend'")
    for start, T, pads in ((0, 5, None), (0, 6, [0, 2, 3]), (6, 1, [0, 2, 3]), (4, 2, [1, 0])):
        pad_lens = None if pads is None else torch.tensor(pads)
        S = start + T
        name = f"attention_mask.start{start}_T{T}" + ("" if pads is None else "_pad" + "".join(map(str, pads)))
        inputs = {} if pad_lens is None else {"pad_lens": pad_lens}
        c = w.case(name, inputs, attention_mask(start, T, pad_lens), params={"start": start, "seq_len": T},
                   hint="key j visible to the query in slot i when j <= i and j >= pad_lens[b]; a padding query "
                        "sees itself only",
                   shape_causes={str([1, 1, T, S]): "pad_lens is ignored: with padding the mask has one row per "
                                 "batch entry, (B, 1, T, S)"})
        q_slots = torch.arange(start, S)[:, None]
        k_slots = torch.arange(S)[None, :]
        if start:
            top_left = (k_slots <= torch.arange(T)[:, None])[None, None]
            if pad_lens is not None:
                top_left = top_left & (k_slots >= pad_lens[:, None, None, None]) | (k_slots == torch.arange(T)[:, None])
            c.mistake("top_left", top_left, "the queries are numbered from 0; they sit in cache slots start … "
                      "start + seq_len − 1, after the cached positions")
        if pad_lens is None:
            continue
        causal = (k_slots <= q_slots)[None, None]
        c.mistake("padding_ignored", causal.expand(len(pads), 1, T, S).clone(),
                  "padding keys are not masked: key j is padding for row b when j < pad_lens[b]")
        if any(p > start for p in pads):
            c.mistake("padding_query_blind", causal & (k_slots >= pad_lens[:, None, None, None]),
                      "a padding query sees no key at all: its softmax row is empty (NaN); let it see itself")
        c.mistake("pad_off_by_one", (causal & (k_slots > pad_lens[:, None, None, None])) | (k_slots == q_slots),
                  "padding off by one: row b's padding is slots 0 … pad_lens[b] − 1 (j >= pad_lens[b] is visible)")


def forward_variant(attn: Attention, x, cos, sin, mask, *, rope=("q", "k"), transpose_back: bool = True,
                    wo: bool = True, start: int = 0, past=None):
    """Attention.forward rewired for the wrong versions (the reference's projections, rotation and attention)."""
    B, T, _ = x.shape
    q = attn.wq(x).view(B, T, attn.n_heads, attn.head_dim)
    k = attn.wk(x).view(B, T, attn.n_kv_heads, attn.head_dim)
    v = attn.wv(x).view(B, T, attn.n_kv_heads, attn.head_dim)
    q, k, v = (apply_rotary(t, cos, sin) if name in rope else t for name, t in (("q", q), ("k", k), ("v", v)))
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if past is not None:
        k, v = torch.cat((past[0], k), 2), torch.cat((past[1], v), 2)
    y = plain_attention(q, k, v, mask)
    y = (y.transpose(1, 2) if transpose_back else y).reshape(B, T, -1)
    return attn.wo(y) if wo else y


def recording_rotary(calls: list):
    def rotary(x, cos, sin):
        out = apply_rotary(x, cos, sin)
        calls.append((x.detach().clone(), out.detach().clone()))
        return out
    return rotary


def attention_forward_cases(w: Writer) -> None:
    g = generator(41)
    config = ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=16, multiple_of=16, max_seq_len=16,
                         attn_impl="plain")
    attn = Attention(config)
    weights = {name: randn(g, *getattr(attn, name).weight.shape, std=2.0 / 32 ** 0.5)
               for name in ("wq", "wk", "wv", "wo")}
    for name, t in weights.items():
        getattr(attn, name).weight.data.copy_(t)
    rope = RotaryEmbedding(config.head_dim, 100.0)
    hint = ("project, view as (B, T, heads, d), rotate q and k, transpose to (B, heads, T, d), attend, transpose "
            "back, reshape to (B, T, H·d), wo")

    def recorded(x, cos, sin, mask, start=0):
        calls = []
        saved, attention_module.apply_rotary = attention_module.apply_rotary, recording_rotary(calls)
        try:
            y = attn(x, cos, sin, mask, start)
        finally:
            attention_module.apply_rotary = saved
        (q_in, q_out), (k_in, k_out) = calls
        B, T, _ = x.shape
        return y, {"rotary.q_in": q_in, "rotary.q_out": q_out, "rotary.k_in": k_in, "rotary.k_out": k_out,
                   "rotary.v_in": attn.wv(x).view(B, T, config.n_kv_heads, config.head_dim)}

    x = randn(g, 2, 5, 32)
    cos, sin = rope(torch.arange(5))
    with torch.no_grad():
        y, calls = recorded(x, cos, sin, None)
        c = w.case("forward.plain", {"x": x, "cos": cos, "sin": sin, **weights, **calls}, y, hint=hint)
        c.mistake("q_only", forward_variant(attn, x, cos, sin, None, rope=("q",)),
                  "RoPE applied to q only: rotate the keys too (apply_rotary on q and on k)")
        c.mistake("k_only", forward_variant(attn, x, cos, sin, None, rope=("k",)),
                  "RoPE applied to k only: rotate the queries too (apply_rotary on q and on k)")
        c.mistake("no_rope", forward_variant(attn, x, cos, sin, None, rope=()),
                  "no rotary embedding: rotate q and k with apply_rotary(·, cos, sin) before attending")
        c.mistake("rope_v", forward_variant(attn, x, cos, sin, None, rope=("q", "k", "v")),
                  "RoPE applied to v: only queries and keys are rotated; values carry content, not position")
        c.mistake("no_transpose_back", forward_variant(attn, x, cos, sin, None, transpose_back=False),
                  "heads merged without transposing back: y is (B, H, T, d); make it (B, T, H, d) "
                  "(y.transpose(1, 2)) before the reshape to (B, T, H·d)")
        c.mistake("no_wo", forward_variant(attn, x, cos, sin, None, wo=False),
                  "the output projection wo is not applied")

        # With a cache holding 3 earlier positions: the grader's stand-in cache checks what update receives.
        start, T = 3, 2
        x = randn(g, 2, T, 32)
        cos, sin = rope(torch.arange(start, start + T))
        past_k, past_v = randn(g, 2, 2, start, 8), randn(g, 2, 2, start, 8)
        attn.cache.allocate(2, 2, 8, 8, torch.float32)
        attn.cache.k[:, :, :start], attn.cache.v[:, :, :start] = past_k, past_v
        y, calls = recorded(x, cos, sin, None, start)
        new_k = attn.cache.k[:, :, start:start + T].clone()
        new_v = attn.cache.v[:, :, start:start + T].clone()
        attn.cache.release()
        c = w.case("forward.cached", {"x": x, "cos": cos, "sin": sin, **weights, **calls,
                                      "cache.k_new": new_k, "cache.v_new": new_v,
                                      "cache.k_full": torch.cat((past_k, new_k), 2),
                                      "cache.v_full": torch.cat((past_v, new_v), 2)}, y,
                   params={"start": start}, hint=hint + "; with an active cache: k, v = self.cache.update(start, k, v)")
        c.mistake("cache_ignored", forward_variant(attn, x, cos, sin, None),
                  "the cache is not used: with an active cache, attend over k, v = self.cache.update(start, k, v) "
                  "(the earlier positions and the new ones)")

        # With a prompt adapter installed: the grader's stand-in adapter checks the queries it receives.
        x = randn(g, 2, 5, 32)
        cos, sin = rope(torch.arange(5))
        adapter_out = randn(g, 2, 4, 5, 8)

        class Fixed(nn.Module):
            def forward(self, q, wk, wv):
                return adapter_out

        attn.prompt_adapter = Fixed()
        y, calls = recorded(x, cos, sin, None)
        attn.prompt_adapter = None
        c = w.case("forward.adapter", {"x": x, "cos": cos, "sin": sin, **weights, **calls,
                                       "adapter.out": adapter_out}, y,
                   hint=hint + "; add self.prompt_adapter(q, self.wk, self.wv) to the heads' output before wo")
        c.mistake("adapter_ignored", attn(x, cos, sin, None),
                  "the prompt adapter's output is not added: y = attend(...) + self.prompt_adapter(q, self.wk, "
                  "self.wv)")


def lab04(w: Writer) -> None:
    mask_cases(w)
    g = generator(4)
    B, H, H_kv, d = 2, 4, 2, 8
    for name, T, S, pads in (("square", 6, 6, None), ("cached", 3, 7, None), ("padded", 6, 6, [0, 2])):
        q, k, v = randn(g, B, H, T, d, std=1.5), randn(g, B, H_kv, S, d, std=1.5), randn(g, B, H_kv, S, d)
        mask = None if pads is None else attention_mask(0, T, torch.tensor(pads))
        inputs = {"q": q, "k": k, "v": v} | ({} if mask is None else {"mask": mask})
        hint = "softmax(q kᵀ / sqrt(d), masked with −inf) v, kv head h // (H / H_kv) for query head h"
        c = w.case(f"plain.{name}", inputs, plain_attention(q, k, v, mask), hint=hint)
        attention_mistakes(c, q, k, v, mask)
        c = w.case(f"sdpa.{name}", inputs, sdpa_attention(q, k, v, mask), hint=hint)
        attention_mistakes(c, q, k, v, mask, sdpa=True)
    attention_forward_cases(w)


# ---- lab 5: KV cache and generation -------------------------------------------------------------------------

def lab05(w: Writer) -> None:
    g = generator(5)
    B, H_kv, S, d = 2, 2, 8, 4
    w.case("allocate", {}, torch.zeros(B, H_kv, S, d, dtype=torch.bfloat16),
           params={"batch_size": B, "n_kv_heads": H_kv, "max_seq_len": S, "head_dim": d},
           dtype_cause="Allocate in the dtype asked for.",
           shape_causes={str([B, S, H_kv, d]): "the cache layout is (batch, n_kv_heads, max_seq_len, head_dim), "
                         "the layout k and v have after the transpose in attention"})
    cache = KVCache()
    cache.allocate(B, H_kv, S, d, torch.float32)
    buffer_k, buffer_v = torch.zeros(B, H_kv, S, d), torch.zeros(B, H_kv, S, d)  # the wrong versions' caches
    at_zero_k, at_zero_v = buffer_k.clone(), buffer_v.clone()
    shifted_k, shifted_v = buffer_k.clone(), buffer_v.clone()
    for step, (start, T) in enumerate(((0, 3), (3, 1), (4, 2))):
        k, v = randn(g, B, H_kv, T, d), randn(g, B, H_kv, T, d)
        end = start + T
        c = w.case(f"update.{step}", {"k": k, "v": v}, cache.update(start, k, v), params={"start": start},
                   hint="write at slots start … start+T−1, return the cache up to the last written slot",
                   shape_causes={str([B, H_kv, S, d]): "update returns the whole buffer: return the cache up to the "
                                 "last written slot, self.k[:, :, :start + T] (the slots after it are still zeros)",
                                 str([B, H_kv, T, d]): "update returns only the new keys/values: return everything "
                                 "cached so far, slots 0 … start+T−1"})
        at_zero_k[:, :, :T], at_zero_v[:, :, :T] = k, v
        shifted_k[:, :, start + 1:end + 1], shifted_v[:, :, start + 1:end + 1] = k, v
        if step:
            c.mistake("at_zero", (at_zero_k[:, :, :end].clone(), at_zero_v[:, :, :end].clone()),
                      "cache written at the wrong slot (always from slot 0): write at slots start … start+T−1")
            c.mistake("shifted", (shifted_k[:, :, :end].clone(), shifted_v[:, :, :end].clone()),
                      "cache written at the wrong slot (one too far): write at slots start … start+T−1")
    w.case("update.buffer", {}, (cache.k, cache.v), hint="every update writes into the preallocated self.k, self.v")
    w.case("update.overflow", {"k": randn(g, B, H_kv, 2, d), "v": randn(g, B, H_kv, 2, d)}, torch.zeros(()),
           params={"start": 7, "capacity": S})

    logits = randn(g, 3, 12, std=2.0)
    for k in (4, 20):
        c = w.case(f"top_k.{k}", {"logits": logits}, filter_top_k(logits, k), params={"k": k},
                   hint="keep the k largest logits of each row, −inf elsewhere")
        if k < 12:
            kth = logits.topk(k, -1).values[:, -1:]
            c.mistake("k_minus_1", logits.masked_fill(logits <= kth, float("-inf")),
                      "keeps k − 1 tokens: the k-th largest itself stays (mask values strictly below it)")
            low = logits.topk(k, -1, largest=False).values[:, -1:]
            c.mistake("smallest", logits.masked_fill(logits > low, float("-inf")), "keeps the k smallest logits")
    for p in (0.6, 0.05):
        c = w.case(f"top_p.{p}", {"logits": logits}, filter_top_p(logits, p), params={"p": p},
                   hint="sort descending, keep a token while the probability mass before it is < p")
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)

        def unsort(drop_sorted):
            return logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))

        c.mistake("drops_crossing", unsort(probs.cumsum(-1) > p),
                  "the token that brings the mass to p is dropped: keep a token while the mass BEFORE it is below p "
                  "(cumsum − prob), so the nucleus reaches at least p and never is empty")
        asc_logits, asc_order = logits.sort(-1)
        asc_probs = asc_logits.softmax(-1)
        drop = torch.zeros_like(asc_probs, dtype=torch.bool).scatter(-1, asc_order,
                                                                     asc_probs.cumsum(-1) - asc_probs >= p)
        c.mistake("ascending", logits.masked_fill(drop, float("-inf")),
                  "sorted ascending: the nucleus is made of the MOST probable tokens (descending=True)")
        c.mistake("sorted_order", logits.masked_fill(probs.cumsum(-1) - probs >= p, float("-inf")),
                  "the drop mask is in sorted order: scatter it back to vocabulary order (order holds the "
                  "vocabulary index of each sorted position)")

    greedy_logits = randn(g, 4, 12, std=2.0)
    w.case("choose.greedy", {"logits": greedy_logits}, greedy_logits.argmax(-1), params={"temperature": 0.0},
           hint="temperature 0 is greedy: argmax over the vocabulary")
    row = randn(g, 1, 12, std=1.5)
    settings = {"temperature": 0.7, "top_k": 6, "top_p": 0.9}

    def distribution(logits, temperature, top_k, top_p, order="kp"):
        z = logits / temperature if temperature else logits
        filters = {"k": lambda z: filter_top_k(z, top_k) if top_k else z,
                   "p": lambda z: filter_top_p(z, top_p) if top_p else z}
        for f in order:
            z = filters[f](z)
        return z.softmax(-1)[0]

    samples = choose_next(row.expand(20000, -1), generator=generator(55), **settings)
    frequencies = torch.bincount(samples, minlength=12).double() / len(samples)
    c = w.case("choose.sampled", {"logits": row}, distribution(row, **settings).double(),
               params=settings | {"samples": 20000}, tol={"atol": 0.03, "rtol": 0.0},
               hint="z / temperature, then top-k, then top-p, softmax, torch.multinomial")
    assert matches(frequencies, distribution(row, **settings).double(), {"atol": 0.03, "rtol": 0.0})
    c.mistake("temperature_times", distribution(row * 0.7 * 0.7, **settings).double(),
              "logits multiplied by the temperature; they are divided by it (z / T: T < 1 sharpens)")
    c.mistake("no_temperature", distribution(row, 1.0, 6, 0.9).double(), "the temperature is not applied")
    c.mistake("no_top_k", distribution(row, 0.7, None, 0.9).double(), "top_k is ignored")
    c.mistake("no_top_p", distribution(row, 0.7, 6, None).double(), "top_p is ignored")


# ---- lab 6: the training loop -----------------------------------------------------------------------------

def lab06(w: Writer) -> None:
    g = generator(6)
    tokens = torch.randint(0, 1000, (60,), generator=g).numpy().astype(np.uint16)  # token files hold uint16
    starts, seq_len = np.array([0, 7, 30, 51]), 8
    x, y = windows(tokens, starts, seq_len)
    c = w.case("windows", {"tokens": torch.from_numpy(tokens.astype(np.int64)), "starts": torch.from_numpy(starts)},
               (torch.from_numpy(x), torch.from_numpy(y)), params={"seq_len": seq_len},
               hint="inputs tokens[s : s+seq_len], targets tokens[s+1 : s+seq_len+1]",
               dtype_cause="Return int64 arrays: the token files hold uint16, the embedding and the loss take int64.",
               shape_causes={str([4, seq_len + 1]): "windows of seq_len + 1 tokens: inputs and targets are seq_len "
                             "long each (drop the last token from the inputs, the first from the targets)"})
    rows = np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64)
    c.mistake("not_shifted", (torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, :-1])),
              "loss not shifted by one: the target at position t is the NEXT token, tokens[s + t + 1]")
    back = np.stack([tokens[max(s - 1, 0):max(s - 1, 0) + seq_len] for s in starts]).astype(np.int64)
    c.mistake("shifted_back", (torch.from_numpy(rows[:, :-1]), torch.from_numpy(back)),
              "targets shifted the wrong way: the target at position t is the next token, tokens[s + t + 1]")

    for name, cfg in (("warmup", TrainConfig(lr=1e-3, warmup_steps=5, max_steps=30, min_lr_ratio=0.1)),
                      ("decay_steps", TrainConfig(lr=2e-3, warmup_steps=3, max_steps=30, decay_steps=20,
                                                  min_lr_ratio=0.2))):
        steps = range(cfg.max_steps + 3)
        fields = {"lr": cfg.lr, "warmup_steps": cfg.warmup_steps, "max_steps": cfg.max_steps,
                  "decay_steps": cfg.decay_steps, "min_lr_ratio": cfg.min_lr_ratio}
        c = w.case(f"get_lr.{name}", {}, torch.tensor([get_lr(s, cfg) for s in steps], dtype=torch.float64),
                   params={"config": fields}, tol={"atol": 1e-9, "rtol": 1e-6},
                   hint="warm-up lr·(step+1)/warmup_steps; cosine from lr to lr·min_lr_ratio between warmup_steps "
                        "and decay_steps (or max_steps); lr·min_lr_ratio after")
        end = cfg.decay_steps or cfg.max_steps
        low = cfg.lr * cfg.min_lr_ratio

        def schedule(warm, floor, progress_of, after):
            out = []
            for s in steps:
                if s < cfg.warmup_steps:
                    out.append(warm(s))
                elif s >= end and after:
                    out.append(floor)
                else:
                    out.append(floor + 0.5 * (1 + math.cos(math.pi * progress_of(s))) * (cfg.lr - floor))
            return torch.tensor(out, dtype=torch.float64)

        right = lambda s: (s - cfg.warmup_steps) / max(1, end - cfg.warmup_steps)  # noqa: E731
        c.mistake("warmup_off_by_one", schedule(lambda s: cfg.lr * s / cfg.warmup_steps, low, right, True),
                  "learning-rate warm-up off by one: step 0 must already train, at lr·1/warmup_steps "
                  "(lr·(step+1)/warmup_steps), reaching the peak at the last warm-up step")
        c.mistake("to_zero", schedule(lambda s: cfg.lr * (s + 1) / cfg.warmup_steps, 0.0, right, True),
                  "the cosine decays to 0; it ends at lr·min_lr_ratio (LLaMA: 10% of the peak)")
        c.mistake("warmup_not_subtracted", schedule(lambda s: cfg.lr * (s + 1) / cfg.warmup_steps, low,
                                                    lambda s: s / end, True),
                  "the cosine starts at step 0: its progress is (step − warmup_steps) / "
                  "(decay_steps − warmup_steps)")
        c.mistake("no_floor", schedule(lambda s: cfg.lr * (s + 1) / cfg.warmup_steps, low, right, False),
                  "the cosine goes on after decay_steps; from there the rate stays at lr·min_lr_ratio")
        if cfg.decay_steps:
            ignored = TrainConfig(lr=cfg.lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
                                  min_lr_ratio=cfg.min_lr_ratio)
            c.mistake("decay_steps_ignored", torch.tensor([get_lr(s, ignored) for s in steps], dtype=torch.float64),
                      "decay_steps is ignored: the cosine ends at decay_steps (at max_steps only when it is 0)")

    shapes = {"tok_embeddings.weight (vocab, dim)": [50, 16], "layers.0.attention.wq.weight (dim, dim)": [16, 16],
              "norm.weight (dim,)": [16], "lora_a (r, in)": [4, 16], "lora_b (out, r)": [16, 4],
              "adapter gate (1, H, 1, 1)": [1, 4, 1, 1], "bottleneck bias (b,)": [8]}
    expected = torch.tensor([decays(torch.empty(s)) for s in shapes.values()])
    c = w.case("decays", {}, expected, params={"shapes": shapes},
               hint="weight decay on the 2-D weight matrices only")
    dims = torch.tensor([len(s) for s in shapes.values()])
    c.mistake("at_least_2d", dims >= 2, "the adapter gate (1, H, 1, 1) is decayed: it is 4-D only to broadcast, "
              "one scalar per head, not a matrix; decay exactly the 2-D tensors (p.dim() == 2)")
    c.mistake("everything", torch.ones(len(shapes), dtype=torch.bool),
              "every tensor is decayed: norm gains, biases and the adapter gate are not (only 2-D matrices)")
    c.mistake("nothing", torch.zeros(len(shapes), dtype=torch.bool), "no tensor is decayed: the 2-D matrices are")


# ---- lab 7: LoRA -----------------------------------------------------------------------------------------

def lab07(w: Writer) -> None:
    g = generator(7)
    n_in, n_out, rank, alpha = 24, 40, 4, 8.0
    W0 = randn(g, n_out, n_in, std=n_in ** -0.5)
    A, B = randn(g, rank, n_in, std=n_in ** -0.5), randn(g, n_out, rank, std=0.5)
    x = randn(g, 3, 5, n_in)
    params = {"in": n_in, "out": n_out, "rank": rank, "alpha": alpha}
    inputs = {"W": W0, "A": A, "B": B}

    def make():
        base = nn.Linear(n_in, n_out, bias=False)
        base.weight.data.copy_(W0)
        lora = LoRALinear(base, rank, alpha, 0.0)
        lora.lora_a.data.copy_(A)
        lora.lora_b.data.copy_(B)
        return lora

    delta = (alpha / rank) * B @ A
    alpha_cause = "LoRA update scaled by α instead of α/r: ΔW = (alpha / r)·B A"
    c = w.case("delta_weight", inputs, make().delta_weight(), params=params, hint="(alpha / r)·B A, float32 (out, in)",
               dtype_cause="Return the update in float32.",
               shape_causes={str([n_in, n_in]): "Aᵀ B has shape (in, in); the update is B A, "
                                                "(out, r)·(r, in) = (out, in)"})
    c.mistake("alpha", alpha * B @ A, alpha_cause)
    c.mistake("no_scale", B @ A, "the update is not scaled: ΔW = (alpha / r)·B A")
    c.mistake("r_over_alpha", (rank / alpha) * B @ A, "scaled by r/α; it is α/r")

    base_out = x @ W0.T
    c = w.case("forward", inputs | {"x": x}, make()(x), params=params, hint="W x + (alpha / r)·B A x")
    c.mistake("alpha", base_out + alpha * x @ A.T @ B.T, alpha_cause)
    c.mistake("no_scale", base_out + x @ A.T @ B.T, "the low-rank path is not scaled by alpha / r")
    c.mistake("no_base", (alpha / rank) * x @ A.T @ B.T, "the frozen path W x is missing")

    lora = make()
    lora.merge()
    merged_w = lora.weight.detach().clone()
    c = w.case("merge", inputs, merged_w, params=params, hint="W <- W + (alpha / r)·B A, once")
    c.mistake("twice", W0 + 2 * delta, "LoRA merged twice: merge() must do nothing when already merged")
    c.mistake("no_scale", W0 + B @ A, "merged without the alpha / r scale")
    c.mistake("alpha", W0 + alpha * B @ A, alpha_cause)
    c = w.case("merged_forward", inputs | {"x": x}, lora(x), params=params,
               hint="after merge() the update is inside W: the forward is W x alone")
    c.mistake("counted_twice", x @ merged_w.T + (alpha / rank) * x @ A.T @ B.T,
              "the low-rank path is added although B A is already merged into W (counted twice)")
    lora.unmerge()
    c = w.case("unmerge", inputs, lora.weight.detach().clone(), params=params, hint="W <- W − (alpha / r)·B A, once")
    c.mistake("adds", W0 + 2 * delta, "unmerge adds the update again; it subtracts it")
    c.mistake("still_merged", W0 + delta, "unmerge leaves the update in W: W <- W − (alpha / r)·B A")
    c.mistake("twice", W0 - delta, "LoRA unmerged twice: unmerge() must do nothing unless merged")


# ---- lab 8: LLaMA-Adapter ------------------------------------------------------------------------------------

def lab08(w: Writer) -> None:
    g = generator(8)
    dim, H, H_kv, K = 32, 4, 2, 6
    d = dim // H
    prompt = randn(g, K, dim)
    wk_w, wv_w = randn(g, H_kv * d, dim, std=dim ** -0.5), randn(g, H_kv * d, dim, std=dim ** -0.5)
    gate = torch.tensor([0.5, -1.0, 2.0, 0.25]).view(1, H, 1, 1)
    q = randn(g, 2, H, 5, d, std=1.5)
    wk, wv = nn.Linear(dim, H_kv * d, bias=False), nn.Linear(dim, H_kv * d, bias=False)
    wk.weight.data.copy_(wk_w)
    wv.weight.data.copy_(wv_w)
    params = {"adapter_len": K, "dim": dim, "n_heads": H, "n_kv_heads": H_kv}
    inputs = {"prompt": prompt, "wk": wk_w, "wv": wv_w}

    def make(gate_tanh):
        adapter = AdapterPrompt(K, dim, H, H_kv, gate_tanh)
        adapter.prompt.data.copy_(prompt)
        adapter.gate.data.copy_(gate)
        return adapter

    with torch.no_grad():
        k_kv = (prompt @ wk_w.T).view(K, H_kv, d).transpose(0, 1)  # (H_kv, K, d)
        v_kv = (prompt @ wv_w.T).view(K, H_kv, d).transpose(0, 1)
        c = w.case("prompt_kv", inputs, make(False).prompt_kv(wk, wv), params=params,
                   hint="wk(P), wv(P) viewed (K, H_kv, d), no rotary, (H_kv, K, d), kv head h // groups for "
                        "query head h",
                   shape_causes={str([1, H_kv, K, d]): "the kv heads are not repeated for the query heads: "
                                 "(1, n_heads, K, d), kv head h // (n_heads / n_kv_heads) for query head h"})
        c.mistake("repeat", (k_kv.repeat(2, 1, 1)[None], v_kv.repeat(2, 1, 1)[None]),
                  "GQA with repeat instead of repeat_interleave: query head h reads kv head h // (H / H_kv)")
        cos, sin = RotaryEmbedding(d, 10000.0)(torch.arange(K))
        rotated = apply_rotary((prompt @ wk_w.T).view(1, K, H_kv, d), cos, sin)[0].transpose(0, 1)
        c.mistake("rotary", (rotated.repeat_interleave(2, 0)[None], v_kv.repeat_interleave(2, 0)[None]),
                  "adapter prompts given rotary positions: the prompts have no position, their keys are not rotated")

        k_full, v_full = k_kv.repeat_interleave(2, 0)[None], v_kv.repeat_interleave(2, 0)[None]

        def gated(g_factor, scale=math.sqrt(d), dim_=-1):
            return g_factor * (F.softmax(q @ k_full.transpose(-2, -1) / scale, dim=dim_) @ v_full)

        for gate_tanh in (False, True):
            factor = torch.tanh(gate) if gate_tanh else gate
            c = w.case(f"forward.{'tanh' if gate_tanh else 'plain'}", inputs | {"q": q, "gate": gate},
                       make(gate_tanh)(q, wk, wv), params=params | {"gate_tanh": gate_tanh},
                       hint="gate · softmax(q P_kᵀ / sqrt(d)) P_v, the gate per head" +
                            (", tanh(gate) with gate_tanh" if gate_tanh else ""))
            if gate_tanh:
                c.mistake("no_tanh", gated(gate), "gate not tanh'd although gate_tanh asks for it: the factor is "
                          "tanh(gate) with gate_tanh=True (the official code), the gate itself otherwise (the paper)")
            else:
                c.mistake("tanh_always", gated(torch.tanh(gate)), "tanh applied although gate_tanh is False: "
                          "the paper multiplies by the gate itself; tanh only with gate_tanh=True")
            c.mistake("scalar_gate", gated(factor.mean()), "one scalar gate instead of per head: each head h has its "
                      "own gate (shape (1, H, 1, 1)), broadcast over (B, H, T, d)")
            c.mistake("no_gate", gated(torch.ones(())), "the gate is not applied: zero-init attention multiplies "
                      "the prompt attention by the (zero-initialised) gate")
            c.mistake("scale_d", gated(factor, scale=d), SCALE_D)
            c.mistake("softmax_axis", gated(factor, dim_=-2), "softmax over the wrong axis: each query's weights sum "
                      "to 1 over the K prompts (dim=-1)")


LABS = {1: lab01, 2: lab02, 3: lab03, 4: lab04, 5: lab05, 6: lab06, 7: lab07, 8: lab08, 10: lab10, 11: lab11}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lab.make_fixtures", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=LAB_DIR / "fixtures")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for number, make in LABS.items():
        torch.manual_seed(number)  # module constructors draw from the global generator
        w = Writer()
        make(w)
        w.save(args.out / f"lab{number:02d}")
        n_variants = sum(len(c.get("causes", {})) for c in w.cases.values())
        print(f"lab {number}: {len(w.cases)} cases, {n_variants} wrong versions -> {args.out / f'lab{number:02d}'}.*")


if __name__ == "__main__":
    main()
