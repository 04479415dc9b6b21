"""Lab 4, causal attention: the mistakes students make in the masks, ``plain_attention``, ``sdpa_attention``
and ``Attention.forward``, and the inputs that show them."""

import torch
from torch import nn

import llama_min.attention as attention_module
from llama_min.config import ModelConfig
from llama_min.rope import RotaryEmbedding, apply_rotary

from ..mutations import m
from . import EXACT_BF16, Case, generator, randn

MASK, CAUSAL = "llama_min/attention.py::attention_mask", "llama_min/attention.py::causal_mask"
PLAIN, SDPA = "llama_min/attention.py::plain_attention", "llama_min/attention.py::sdpa_attention"
ATTENTION = "llama_min/attention.py::Attention.forward"
ROTATE_QK = "q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)"
REPEAT = ("query head h reads kv head h // (H / H_kv), so each kv head is repeated for consecutive query heads "
          "(k.repeat_interleave(groups, dim=1))")
TOP_LEFT = ("with fewer queries than keys the T queries are the LAST T of S positions, so query i sees keys "
            "j <= i + S − T (bottom-right)")
SCALE = "Vaswani et al. eq. 1: softmax(q kᵀ / sqrt(d_k)) v, d the head dimension"

MUTATIONS = [
    m("mask_padding_query_blind", 4, MASK, "a padding query sees no key at all",
      ("mask = (mask & not_pad) | (k_slots == q_slots)", "mask = mask & not_pad"),
      why="its softmax row is empty (NaN); let it see itself"),
    m("mask_padding_off_by_one", 4, MASK, "padding off by one", ("k_slots >= pad_lens", "k_slots > pad_lens"),
      why="row b's padding is slots 0 … pad_lens[b] − 1 (j >= pad_lens[b] is visible)"),
    m("mask_padding_ignored", 4, MASK, "pad_lens is ignored", ("if pad_lens is not None:", "if False:"),
      why="key j is padding for row b when j < pad_lens[b]; with padding the mask is (B, 1, T, S)"),
    m("mask_queries_from_zero", 4, MASK, "the queries are numbered from 0",
      ("torch.arange(start, start + seq_len, device=device)[:, None]",
       "torch.arange(seq_len, device=device)[:, None]"),
      why="they sit in cache slots start … start + seq_len − 1, after the cached positions"),
    m("mask_top_left", 4, CAUSAL, "causal triangle aligned top-left", ("tril(diagonal=S - T)", "tril()"), why=TOP_LEFT),
    m("mask_off_by_one_future", 4, CAUSAL, "also sees the next token",
      ("tril(diagonal=S - T)", "tril(diagonal=S - T + 1)"), why="mask off by one: keys j <= i + S − T only"),
    m("mask_off_by_one_self", 4, CAUSAL, "must see its own position",
      ("tril(diagonal=S - T)", "tril(diagonal=S - T - 1)"), why="mask off by one: j <= i + S − T, not <"),
    m("mask_causal_inverted", 4, CAUSAL, "the mask is inverted",
      ("tril(diagonal=S - T)", "triu(diagonal=S - T + 1)"), why="True means 'may attend': the lower triangle"),
    m("attention_scores_over_d", 4, PLAIN, "divided by d instead of √d",
      ("/ math.sqrt(q.shape[-1])", "/ q.shape[-1]"), why=SCALE),
    m("attention_not_scaled", 4, PLAIN, "scores not scaled", (" / math.sqrt(q.shape[-1])", ""), why=SCALE),
    m("attention_scaled_by_seq_len", 4, PLAIN, "scaled by the number of keys",
      ("/ math.sqrt(q.shape[-1])", "/ math.sqrt(k.shape[-2])"), why=SCALE),
    m("attention_gqa_repeat", 4, PLAIN, "GQA with repeat instead of repeat_interleave",
      ("k = k.repeat_interleave(groups, dim=1)", "k = k.repeat(1, groups, 1, 1)"),
      ("v = v.repeat_interleave(groups, dim=1)", "v = v.repeat(1, groups, 1, 1)"), why=REPEAT),
    m("attention_softmax_axis", 4, PLAIN, "softmax over the wrong axis", ("dim=-1).type_as(q)", "dim=-2).type_as(q)"),
      why="each query's weights sum to 1 over the keys (dim=-1)"),
    m("attention_softmax_in_input_dtype", 4, PLAIN, "softmax in bfloat16",
      ("F.softmax(scores.float(), dim=-1)", "(scores.exp() / scores.exp().sum(dim=-1, keepdim=True))"),
      why="exponentials summed in bfloat16 keep 8 bits; take the softmax in float32 (F.softmax(scores.float(), "
          "dim=-1)) and cast the weights back (.type_as(q))"),
    m("attention_mask_after_softmax", 4, PLAIN, "mask applied after the softmax",
      ("scores = scores.masked_fill(~mask, float('-inf'))", "pass"),
      ("return weights @ v", "return weights.masked_fill(~mask, 0.0) @ v"),
      why="masked scores must be −inf before it, so that the visible weights still sum to 1"),
    m("attention_mask_zero_not_inf", 4, PLAIN, "masked scores set to 0 instead of −inf",
      ("masked_fill(~mask, float('-inf'))", "masked_fill(~mask, 0.0)"),
      why="a score of 0 still gets weight exp(0); −inf gets weight 0"),
    m("attention_mask_inverted", 4, PLAIN, "the mask is used inverted", ("masked_fill(~mask,", "masked_fill(mask,"),
      why="fill −inf where the mask is False (masked_fill(~mask, −inf))"),
    m("attention_mask_ignored", 4, PLAIN, "the mask argument is ignored", ("if mask is None:", "if True:"),
      why="when a mask is given (left padding), use it instead of the causal one"),
    m("attention_no_mask", 4, PLAIN, "no mask at all", ("scores = scores.masked_fill(~mask, float('-inf'))", "pass"),
      why="a token must not see later tokens (mask None means the causal mask)"),
    m("sdpa_is_causal_with_cache", 4, SDPA, "causal triangle aligned top-left",
      ("if mask is None and T == S and T > 1:", "if mask is None and T > 1:"),
      why=TOP_LEFT + " (is_causal=True is top-left: pass causal_mask(T, S) instead)"),
    m("sdpa_gqa_repeat", 4, SDPA, "GQA with repeat instead of repeat_interleave",
      ("if q.shape[1] != k.shape[1] and not kernel_broadcasts_kv_heads(q, mask):", "if q.shape[1] != k.shape[1]:"),
      ("k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)",
       "k.repeat(1, groups, 1, 1), v.repeat(1, groups, 1, 1)"), why=REPEAT),
    m("sdpa_mask_ignored", 4, SDPA, "the mask argument is ignored",
      ("return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)",
       "return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)"),
      why="when a mask is given (left padding), pass it as attn_mask"),
    m("rope_on_v", 4, ATTENTION, "RoPE applied to v",
      (ROTATE_QK, "q, k, v = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), apply_rotary(v, cos, sin)"),
      why="only queries and keys are rotated; values carry content, not position"),
    m("rope_on_q_only", 4, ATTENTION, "RoPE applied to q only", (ROTATE_QK, "q = apply_rotary(q, cos, sin)"),
      why="rotate the keys too (apply_rotary on q and on k)"),
    m("rope_on_k_only", 4, ATTENTION, "RoPE applied to k only", (ROTATE_QK, "k = apply_rotary(k, cos, sin)"),
      why="rotate the queries too (apply_rotary on q and on k)"),
    m("attention_no_rope", 4, ATTENTION, "no rotary embedding", (ROTATE_QK, "pass"),
      why="rotate q and k with apply_rotary(·, cos, sin) before attending"),
    m("attention_rope_at_prefill_only", 4, ATTENTION, "the keys before the rotation",
      (ROTATE_QK, "q = apply_rotary(q, cos, sin)\n        if start == 0:\n            k = apply_rotary(k, cos, sin)"),
      why="keys are rotated at every step, prefill and decode alike; the cache stores rotated keys"),
    m("attention_heads_view", 4, ATTENTION, "viewed as (B, T, heads, d)",
      ("q = self.wq(x).view(B, T, self.n_heads, self.head_dim)",
       "q = self.wq(x).view(B, self.n_heads, T, self.head_dim).transpose(1, 2)"),
      why="the projection's last axis holds the heads one after another: view (B, T, heads, d), then transpose"),
    m("attention_no_transpose_back", 4, ATTENTION, "heads merged without transposing back",
      ("y.transpose(1, 2).reshape(B, T, -1)", "y.reshape(B, T, -1)"),
      why="y is (B, H, T, d); make it (B, T, H, d) (y.transpose(1, 2)) before the reshape to (B, T, H·d)"),
    m("attention_no_wo", 4, ATTENTION, "the output projection wo is not applied",
      ("return self.wo(y.transpose(1, 2).reshape(B, T, -1))", "return y.transpose(1, 2).reshape(B, T, -1)"),
      why="the heads' concatenation goes through wo"),
    m("attention_cache_ignored", 4, ATTENTION, "the cache is not used",
      ("k, v = self.cache.update(start, k, v)", "self.cache.update(start, k, v)"),
      why="with an active cache, attend over k, v = self.cache.update(start, k, v) (the earlier positions and "
          "the new ones)"),
    m("attention_cache_before_rotary", 4, ATTENTION, "the keys before the rotation",
      ("k, v = self.cache.update(start, k, v)",
       "k, v = self.cache.update(start, self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2), v)"),
      why="the cache stores rotated keys: apply_rotary to k before self.cache.update"),
    m("attention_cache_start_zero", 4, ATTENTION, "pass Attention.forward's `start` through",
      ("self.cache.update(start, k, v)", "self.cache.update(0, k, v)"), why="the new tokens go to slots start …"),
    m("attention_adapter_ignored", 4, ATTENTION, "the prompt adapter's output is not added",
      ("y = y + self.prompt_adapter(q, self.wk, self.wv, visual)", "pass"),
      why="y = attend(...) + self.prompt_adapter(q, self.wk, self.wv)"),
    m("attention_adapter_after_wo", 4, ATTENTION, "the prompt adapter's output is added after wo",
      ("y = y + self.prompt_adapter(q, self.wk, self.wv, visual)", "pass"),
      ("return self.wo(y.transpose(1, 2).reshape(B, T, -1))",
       "out = self.wo(y.transpose(1, 2).reshape(B, T, -1))\n        if self.prompt_adapter is not None:\n"
       "            out = out + self.prompt_adapter(q, self.wk, self.wv).transpose(1, 2).reshape(B, T, -1)\n"
       "        return out"),
      why="add it to the heads' output (B, H, T, d), before the heads are merged and projected by wo"),
]


def mask_cases():
    for T, S in ((5, 5), (3, 7), (1, 6)):
        yield Case(f"causal_mask.{T}x{S}", {}, lambda code, t, T=T, S=S: code.causal_mask(T, S),
                   params={"T": T, "S": S}, hint="query i (the last T of S positions) sees key j when j <= i + S − T")
    for start, T, pads in ((0, 5, None), (0, 6, [0, 2, 3]), (6, 1, [0, 2, 3]), (4, 2, [1, 0])):
        name = f"attention_mask.start{start}_T{T}" + ("" if pads is None else "_pad" + "".join(map(str, pads)))
        inputs = {} if pads is None else {"pad_lens": torch.tensor(pads)}
        yield Case(name, inputs, lambda code, t, start=start, T=T: code.attention_mask(start, T, t.get("pad_lens")),
                   params={"start": start, "seq_len": T},
                   hint="key j visible to the query in slot i when j <= i and j >= pad_lens[b]; a padding query "
                        "sees itself only",
                   shape_causes={str([1, 1, T, start + T]): "pad_lens is ignored: with padding the mask has one row "
                                 "per batch entry, (B, 1, T, S)"} if pads else {})


def attention_cases(g):
    B, H, H_kv, d = 2, 4, 2, 8
    hint = "softmax(q kᵀ / sqrt(d), masked with −inf) v, kv head h // (H / H_kv) for query head h"
    for name, T, S, pads in (("square", 6, 6, None), ("cached", 3, 7, None), ("padded", 6, 6, [0, 2])):
        q, k, v = randn(g, B, H, T, d, std=1.5), randn(g, B, H_kv, S, d, std=1.5), randn(g, B, H_kv, S, d)
        mask = None if pads is None else attention_mask_reference(T, pads)
        inputs = {"q": q, "k": k, "v": v} | ({} if mask is None else {"mask": mask})
        for impl in ("plain", "sdpa"):
            yield Case(f"{impl}.{name}", inputs, lambda code, t, impl=impl: getattr(code, f"{impl}_attention")(
                t["q"], t["k"], t["v"], t.get("mask")), hint=hint)
    # bfloat16 with long rows of large scores: the softmax must run in float32
    q, k, v = (randn(g, 1, H, 48, d, std=3.0).bfloat16(), randn(g, 1, H_kv, 48, d, std=3.0).bfloat16(),
               randn(g, 1, H_kv, 48, d).bfloat16())
    yield Case("plain.bfloat16", {"q": q, "k": k, "v": v},
               lambda code, t: code.plain_attention(t["q"], t["k"], t["v"], None), tol=EXACT_BF16, hint=hint,
               dtype_cause="Return q's dtype: the softmax runs in float32 and its weights are cast back (.type_as(q)).")


def attention_mask_reference(T, pads):
    return attention_module.attention_mask(0, T, torch.tensor(pads))


class FixedAdapter(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, q, wk, wv, visual=None):
        return self.out


CONFIG = dict(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=16, multiple_of=16, max_seq_len=16,
              attn_impl="plain")


def module(code, t):
    attn = code.Attention(ModelConfig(**CONFIG))
    for name in ("wq", "wk", "wv", "wo"):
        getattr(attn, name).weight.copy_(t[name])
    return attn


def run_forward(code, t, start=0):
    attn = module(code, t)
    if "cache.k_past" in t:
        past_k, past_v = t["cache.k_past"], t["cache.v_past"]
        attn.cache.allocate(past_k.shape[0], past_k.shape[1], 8, past_k.shape[3], torch.float32)
        attn.cache.k[:, :, :start], attn.cache.v[:, :, :start] = past_k, past_v
    if "adapter.out" in t:
        attn.prompt_adapter = FixedAdapter(t["adapter.out"])
    return attn(t["x"], t["cos"], t["sin"], None, start)


def record(code, t, start=0):
    """What the grader's stand-ins replay: apply_rotary's inputs and outputs, and what the cache receives."""
    calls = []

    def rotary(x, cos, sin):
        out = apply_rotary(x, cos, sin)
        calls.append((x.clone(), out.clone()))
        return out
    saved, attention_module.apply_rotary = attention_module.apply_rotary, rotary
    try:
        run_forward(code, t, start)
    finally:
        attention_module.apply_rotary = saved
    (q_in, q_out), (k_in, k_out) = calls
    B, T, _ = t["x"].shape
    out = {"rotary.q_in": q_in, "rotary.q_out": q_out, "rotary.k_in": k_in, "rotary.k_out": k_out,
           "rotary.v_in": (t["x"] @ t["wv"].T).view(B, T, 2, 8)}
    if "cache.k_past" in t:
        new_k, new_v = k_out.transpose(1, 2), out["rotary.v_in"].transpose(1, 2)
        out |= {"cache.k_new": new_k, "cache.v_new": new_v,
                "cache.k_full": torch.cat((t["cache.k_past"], new_k), 2),
                "cache.v_full": torch.cat((t["cache.v_past"], new_v), 2)}
    return out


def forward_cases(g):
    weights = {name: randn(g, *shape, std=2.0 / 32 ** 0.5)
               for name, shape in (("wq", (32, 32)), ("wk", (16, 32)), ("wv", (16, 32)), ("wo", (32, 32)))}
    rope = RotaryEmbedding(8, 100.0)
    hint = ("project, view as (B, T, heads, d), rotate q and k, transpose to (B, heads, T, d), attend, transpose "
            "back, reshape to (B, T, H·d), wo")
    cos, sin = rope(torch.arange(5))
    yield Case("forward.plain", {"x": randn(g, 2, 5, 32), "cos": cos, "sin": sin, **weights}, run_forward,
               record=record, hint=hint)
    start, T = 3, 2  # two new tokens after 3 cached positions: the grader's stand-in cache checks what it receives
    cos, sin = rope(torch.arange(start, start + T))
    inputs = {"x": randn(g, 2, T, 32), "cos": cos, "sin": sin, **weights,
              "cache.k_past": randn(g, 2, 2, start, 8), "cache.v_past": randn(g, 2, 2, start, 8)}
    yield Case("forward.cached", inputs, lambda code, t: run_forward(code, t, start),
               record=lambda code, t: record(code, t, start), params={"start": start},
               hint=hint + "; with an active cache: k, v = self.cache.update(start, k, v)")
    cos, sin = rope(torch.arange(5))
    inputs = {"x": randn(g, 2, 5, 32), "cos": cos, "sin": sin, **weights, "adapter.out": randn(g, 2, 4, 5, 8)}
    yield Case("forward.adapter", inputs, run_forward, record=record,
               hint=hint + "; add self.prompt_adapter(q, self.wk, self.wv) to the heads' output before wo")


def cases():
    g = generator(4)
    yield from mask_cases()
    yield from attention_cases(g)
    yield from forward_cases(generator(41))
