"""The mutation catalogue: typical student mistakes, each a small text patch on one reference function, with
the phrase the owning lab's grader must use to name it. ``python -m lab.selfcheck`` applies each patch to a
student version that has the reference filled in and checks that the lab's grader fails (the mistake is
caught) with a message containing the phrase (the mistake is named).

A patch is a list of (find, replace) edits; each ``find`` must occur exactly once inside the function.
"""

from __future__ import annotations

from dataclasses import dataclass

from .source import function_span


@dataclass(frozen=True)
class Mutation:
    name: str
    lab: int
    function: str  # FILE::QUALNAME
    edits: tuple[tuple[str, str], ...]
    cause: str  # the grader's message must contain this (case-insensitive)

    @property
    def file(self) -> str:
        return self.function.partition("::")[0]

    def apply(self, source: str) -> str:
        """``source`` (the whole file) with the edits made inside the function."""
        span = function_span(source, self.function.partition("::")[2])
        lines = source.splitlines()
        body = "\n".join(lines[span.start - 1:span.end])
        for find, replace in self.edits:
            if body.count(find) != 1:
                raise ValueError(f"mutation {self.name}: {find!r} occurs {body.count(find)} times in {self.function}")
            body = body.replace(find, replace)
        lines[span.start - 1:span.end] = body.splitlines()
        return "\n".join(lines) + "\n"


def m(name: str, lab: int, function: str, cause: str, *edits: tuple[str, str]) -> Mutation:
    return Mutation(name, lab, function, tuple(edits), cause)


RMS = "llama_min/rmsnorm.py::RMSNorm.forward"
FFN = "llama_min/feedforward.py::FeedForward.forward"
INV_FREQ = "llama_min/rope.py::RotaryEmbedding.inv_freq"
COS_SIN, ROTATE = "llama_min/rope.py::RotaryEmbedding.forward", "llama_min/rope.py::apply_rotary"
MASK, CAUSAL = "llama_min/attention.py::attention_mask", "llama_min/attention.py::causal_mask"
PLAIN, SDPA = "llama_min/attention.py::plain_attention", "llama_min/attention.py::sdpa_attention"
ATTENTION = "llama_min/attention.py::Attention.forward"
ALLOCATE, UPDATE = "llama_min/kv_cache.py::KVCache.allocate", "llama_min/kv_cache.py::KVCache.update"
TOP_K, TOP_P, CHOOSE = ("llama_min/generation.py::filter_top_k", "llama_min/generation.py::filter_top_p",
                        "llama_min/generation.py::choose_next")
WINDOWS, GET_LR, DECAYS = ("llama_min/training/data.py::windows", "llama_min/training/optim.py::get_lr",
                           "llama_min/training/optim.py::decays")
LORA = "llama_min/peft/lora.py::LoRALinear."
ADAPTER = "llama_min/peft/adapter.py::AdapterPrompt."

CATALOGUE: list[Mutation] = [
    # lab 1: RMSNorm
    m("rmsnorm_no_eps", 1, RMS, "RMSNorm without eps", (" + self.eps)", ")")),
    m("rmsnorm_eps_outside_sqrt", 1, RMS, "eps added outside the square root",
      ("torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)",
       "1 / (torch.sqrt(x32.pow(2).mean(dim=-1, keepdim=True)) + self.eps)")),
    m("rmsnorm_wrong_axis", 1, RMS, "mean over the wrong axis", ("mean(dim=-1", "mean(dim=0")),
    m("rmsnorm_subtracts_mean", 1, RMS, "subtracts the mean",
      ("x32 = x.float()", "x32 = x.float()\n        x32 = x32 - x32.mean(dim=-1, keepdim=True)")),
    m("rmsnorm_in_bf16", 1, RMS, "computed in bfloat16", ("x32 = x.float()", "x32 = x")),
    m("rmsnorm_no_gain", 1, RMS, "the gain self.weight is not applied", (" * self.weight", "")),
    m("rmsnorm_sqrt_not_rsqrt", 1, RMS, "multiplies by the root mean square", ("torch.rsqrt", "torch.sqrt")),
    m("rmsnorm_sum_not_mean", 1, RMS, "sum of squares instead of the mean", (".mean(dim=-1", ".sum(dim=-1")),
    m("rmsnorm_fixed_eps", 1, RMS, "eps is hard-coded", ("self.eps", "1e-6")),
    m("rmsnorm_gain_before_cast", 1, RMS, "the gain is applied before casting back",
      ("return normed.type_as(x) * self.weight", "return (normed * self.weight).type_as(x)")),
    # lab 2: SwiGLU
    m("swiglu_silu_on_w3", 2, FFN, "SiLU on the wrong branch",
      ("F.silu(self.w1(x)) * self.w3(x)", "self.w1(x) * F.silu(self.w3(x))")),
    m("swiglu_relu", 2, FFN, "ReLU instead of SiLU", ("F.silu", "F.relu")),
    m("swiglu_sigmoid", 2, FFN, "sigmoid instead of SiLU", ("F.silu", "torch.sigmoid")),
    m("swiglu_gelu", 2, FFN, "GELU instead of SiLU", ("F.silu", "F.gelu")),
    m("swiglu_added", 2, FFN, "the branches are added", (") * self.w3", ") + self.w3")),
    # lab 3: RoPE
    m("rope_halves", 3, ROTATE, "rotating halves (GPT-NeoX",
      ("x.float().unflatten(-1, (-1, 2))", "x.float().unflatten(-1, (2, -1)).transpose(-1, -2)"),
      ("rotated.flatten(-2)", "rotated.transpose(-1, -2).flatten(-2)")),
    m("rope_i_over_d", 3, INV_FREQ, "θ^(−i/d) instead of θ^(−2i/d)",
      ("torch.arange(0, self.head_dim, 2, device=device)", "torch.arange(0, self.head_dim // 2, device=device)")),
    m("rope_positive_exponent", 3, INV_FREQ, "the exponent has the wrong sign", ("(-torch.arange", "(torch.arange")),
    m("rope_rotation_sign", 3, ROTATE, "rotation in the wrong direction",
      ("even * cos - odd * sin, even * sin + odd * cos", "even * cos + odd * sin, -even * sin + odd * cos")),
    m("rope_cos_sin_swapped", 3, COS_SIN, "cos and sin swapped",
      ("return angles.cos(), angles.sin()", "return angles.sin(), angles.cos()")),
    m("rope_positions_from_one", 3, COS_SIN, "positions counted from 1",
      ("positions.float()[..., None]", "(positions.float()[..., None] + 1)")),
    # lab 4: attention
    m("mask_padding_query_blind", 4, MASK, "a padding query sees no key at all",
      ("mask = (mask & not_pad) | (k_slots == q_slots)", "mask = mask & not_pad")),
    m("mask_padding_off_by_one", 4, MASK, "padding off by one", ("k_slots >= pad_lens", "k_slots > pad_lens")),
    m("mask_queries_from_zero", 4, MASK, "the queries are numbered from 0",
      ("torch.arange(start, start + seq_len, device=device)[:, None]",
       "torch.arange(seq_len, device=device)[:, None]")),
    m("mask_top_left", 4, CAUSAL, "causal triangle aligned top-left", ("tril(diagonal=S - T)", "tril()")),
    m("mask_off_by_one_future", 4, CAUSAL, "also sees the next token",
      ("tril(diagonal=S - T)", "tril(diagonal=S - T + 1)")),
    m("mask_off_by_one_self", 4, CAUSAL, "must see its own position",
      ("tril(diagonal=S - T)", "tril(diagonal=S - T - 1)")),
    m("attention_scores_over_d", 4, PLAIN, "divided by d instead of √d",
      ("/ math.sqrt(q.shape[-1])", "/ q.shape[-1]")),
    m("attention_not_scaled", 4, PLAIN, "scores not scaled", (" / math.sqrt(q.shape[-1])", "")),
    m("attention_gqa_repeat", 4, PLAIN, "GQA with repeat instead of repeat_interleave",
      ("k = k.repeat_interleave(groups, dim=1)", "k = k.repeat(1, groups, 1, 1)"),
      ("v = v.repeat_interleave(groups, dim=1)", "v = v.repeat(1, groups, 1, 1)")),
    m("attention_softmax_axis", 4, PLAIN, "softmax over the wrong axis", ("dim=-1).type_as(q)", "dim=-2).type_as(q)")),
    m("attention_mask_after_softmax", 4, PLAIN, "mask applied after the softmax",
      ('scores = scores.masked_fill(~mask, float("-inf"))', "pass"),
      ("return weights @ v", "return weights.masked_fill(~mask, 0.0) @ v")),
    m("attention_mask_inverted", 4, PLAIN, "the mask is used inverted", ("masked_fill(~mask,", "masked_fill(mask,")),
    m("attention_mask_ignored", 4, PLAIN, "the mask argument is ignored", ("if mask is None:", "if True:")),
    m("sdpa_is_causal_with_cache", 4, SDPA, "causal triangle aligned top-left",
      ("if mask is None and T == S and T > 1:", "if mask is None and T > 1:")),
    m("sdpa_gqa_repeat", 4, SDPA, "GQA with repeat instead of repeat_interleave",
      ("if q.shape[1] != k.shape[1] and not kernel_broadcasts_kv_heads(q, mask):", "if q.shape[1] != k.shape[1]:"),
      ("k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)",
       "k.repeat(1, groups, 1, 1), v.repeat(1, groups, 1, 1)")),
    m("rope_on_v", 4, ATTENTION, "RoPE applied to v",
      ("q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)",
       "q, k, v = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), apply_rotary(v, cos, sin)")),
    m("rope_on_q_only", 4, ATTENTION, "RoPE applied to q only",
      ("q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)", "q = apply_rotary(q, cos, sin)")),
    m("attention_heads_view", 4, ATTENTION, "viewed as (B, T, heads, d)",
      ("q = self.wq(x).view(B, T, self.n_heads, self.head_dim)",
       "q = self.wq(x).view(B, self.n_heads, T, self.head_dim).transpose(1, 2)")),
    m("attention_no_transpose_back", 4, ATTENTION, "heads merged without transposing back",
      ("y.transpose(1, 2).reshape(B, T, -1)", "y.reshape(B, T, -1)")),
    m("attention_cache_ignored", 4, ATTENTION, "the cache is not used",
      ("k, v = self.cache.update(start, k, v)", "self.cache.update(start, k, v)")),
    m("attention_cache_before_rotary", 4, ATTENTION, "the keys before the rotation",
      ("k, v = self.cache.update(start, k, v)",
       "k, v = self.cache.update(start, self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2), v)")),
    m("attention_cache_start_zero", 4, ATTENTION, "pass Attention.forward's `start` through",
      ("self.cache.update(start, k, v)", "self.cache.update(0, k, v)")),
    m("attention_adapter_ignored", 4, ATTENTION, "the prompt adapter's output is not added",
      ("y = y + self.prompt_adapter(q, self.wk, self.wv, visual)", "pass")),
    # lab 5: KV cache and generation
    m("cache_layout", 5, ALLOCATE, "the cache layout is (batch, n_kv_heads, max_seq_len, head_dim)",
      ("shape = (batch_size, n_kv_heads, max_seq_len, head_dim)",
       "shape = (batch_size, max_seq_len, n_kv_heads, head_dim)")),
    m("cache_returns_whole_buffer", 5, UPDATE, "update returns the whole buffer",
      ("return self.k[:, :, :end], self.v[:, :, :end]", "return self.k, self.v")),
    m("cache_returns_only_new", 5, UPDATE, "update returns only the new keys",
      ("return self.k[:, :, :end], self.v[:, :, :end]", "return self.k[:, :, start:end], self.v[:, :, start:end]")),
    m("cache_wrong_slot", 5, UPDATE, "cache written at the wrong slot",
      ("self.k[:, :, start:end] = k", "self.k[:, :, :end - start] = k"),
      ("self.v[:, :, start:end] = v", "self.v[:, :, :end - start] = v")),
    m("cache_no_overflow_check", 5, UPDATE, "expected a ValueError", ("if end > self.k.shape[2]:", "if False:")),
    m("top_k_keeps_k_minus_1", 5, TOP_K, "keeps k − 1 tokens", ("logits < kth", "logits <= kth")),
    m("top_k_beyond_vocabulary", 5, TOP_K, "k may exceed the vocabulary", ("min(k, logits.shape[-1])", "k")),
    m("top_p_drops_crossing_token", 5, TOP_P, "the token that brings the mass to p is dropped",
      ("mass_before = torch.cumsum(probs, dim=-1) - probs", "mass_before = torch.cumsum(probs, dim=-1)")),
    m("top_p_ascending", 5, TOP_P, "sorted ascending", ("descending=True", "descending=False")),
    m("top_p_sorted_order", 5, TOP_P, "the drop mask is in sorted order",
      ("drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)", "drop = drop_sorted")),
    m("sampling_temperature_times", 5, CHOOSE, "logits multiplied by the temperature",
      ("logits = logits / temperature", "logits = logits * temperature")),
    m("sampling_top_p_ignored", 5, CHOOSE, "top_p is ignored",
      ("if top_p is not None and top_p < 1.0:", "if False:")),
    m("sampling_greedy_divides_by_zero", 5, CHOOSE, "temperature 0 means greedy",
      ("if temperature == 0:", "if temperature < 0:")),
    # lab 6: the training loop
    m("loss_not_shifted", 6, WINDOWS, "loss not shifted by one",
      ("return rows[:, :-1], rows[:, 1:]", "return rows[:, :-1], rows[:, :-1]")),
    m("windows_keep_uint16", 6, WINDOWS, "Return int64 arrays", (".astype(np.int64)", "")),
    m("warmup_off_by_one", 6, GET_LR, "warm-up off by one",
      ("(step + 1) / cfg.warmup_steps", "step / cfg.warmup_steps")),
    m("cosine_to_zero", 6, GET_LR, "the cosine decays to 0", ("min_lr = cfg.lr * cfg.min_lr_ratio", "min_lr = 0.0")),
    m("cosine_from_step_zero", 6, GET_LR, "the cosine starts at step 0",
      ("progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)",
       "progress = step / max(1, decay_steps)")),
    m("decay_steps_ignored", 6, GET_LR, "decay_steps is ignored",
      ("decay_steps = cfg.decay_steps or cfg.max_steps", "decay_steps = cfg.max_steps")),
    m("gate_decayed", 6, DECAYS, "the adapter gate (1, H, 1, 1) is decayed", ("p.dim() == 2", "p.dim() >= 2")),
    # lab 7: LoRA
    m("lora_b_random", 7, LORA + "__init__", "LoRA B random",
      ("torch.zeros(self.out_features, rank, **factory)", "torch.randn(self.out_features, rank, **factory)")),
    m("lora_scale_alpha", 7, LORA + "__init__", "scaled by α instead of α/r",
      ("self.scale = alpha / rank", "self.scale = alpha")),
    m("lora_weight_copied", 7, LORA + "__init__", "the frozen weight is copied",
      ("self.weight = base.weight", "self.weight = nn.Parameter(base.weight.detach().clone())")),
    m("lora_a_zero", 7, LORA + "__init__", "A initialised to zeros",
      ("nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))", "nn.init.zeros_(self.lora_a)")),
    m("lora_a_gaussian", 7, LORA + "__init__", "nn.Linear's initialisation",
      ("nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))", "nn.init.normal_(self.lora_a)")),
    m("lora_delta_not_scaled", 7, LORA + "delta_weight", "the update is not scaled", ("self.scale * ", "")),
    m("lora_merged_counted_twice", 7, LORA + "forward", "counted twice", ("if self.merged:", "if False:")),
    m("lora_forward_not_scaled", 7, LORA + "forward", "the low-rank path is not scaled", (" * self.scale", "")),
    m("lora_dropout_everywhere", 7, LORA + "forward", "dropout belongs on the input of the low-rank path only",
      ("y = F.linear(x, self.weight)", "x = self.dropout(x)\n        y = F.linear(x, self.weight)")),
    m("lora_merged_twice", 7, LORA + "merge", "LoRA merged twice", ("if not self.merged:", "if True:")),
    m("lora_unmerge_adds", 7, LORA + "unmerge", "unmerge adds the update",
      ("self.weight.float() - self.delta_weight()", "self.weight.float() + self.delta_weight()")),
    m("lora_unmerged_twice", 7, LORA + "unmerge", "LoRA unmerged twice", ("if self.merged:", "if True:")),
    # lab 8: LLaMA-Adapter
    m("adapter_gate_not_zero", 8, ADAPTER + "__init__", "adapter gate not zero",
      ("torch.zeros(1, n_heads, 1, 1", "torch.ones(1, n_heads, 1, 1")),
    m("adapter_scalar_gate", 8, ADAPTER + "__init__", "one scalar gate instead of per head",
      ("torch.zeros(1, n_heads, 1, 1", "torch.zeros(1, 1, 1, 1")),
    m("adapter_prompts_zero", 8, ADAPTER + "__init__", "prompts initialised to zero",
      ("torch.randn(adapter_len, dim", "torch.zeros(adapter_len, dim")),
    m("adapter_gqa_repeat", 8, ADAPTER + "prompt_kv", "GQA with repeat instead of repeat_interleave",
      ("k = k.repeat_interleave(groups, dim=0)[None]", "k = k.repeat(groups, 1, 1)[None]"),
      ("v = v.repeat_interleave(groups, dim=0)[None]", "v = v.repeat(groups, 1, 1)[None]")),
    m("adapter_kv_not_repeated", 8, ADAPTER + "prompt_kv", "the kv heads are not repeated",
      ("k = k.repeat_interleave(groups, dim=0)[None]", "k = k[None]"),
      ("v = v.repeat_interleave(groups, dim=0)[None]", "v = v[None]")),
    m("adapter_prompts_rotated", 8, ADAPTER + "prompt_kv", "adapter prompts given rotary positions",
      ("k = wk(self.prompt).view(K, self.n_kv_heads, self.head_dim).transpose(0, 1)",
       "from llama_min.rope import RotaryEmbedding, apply_rotary\n"
       "        cos, sin = RotaryEmbedding(self.head_dim, 10000.0)(torch.arange(K))\n"
       "        k = apply_rotary(wk(self.prompt).view(1, K, self.n_kv_heads, self.head_dim), cos, sin)[0]"
       ".transpose(0, 1)")),
    m("adapter_gate_not_tanh", 8, ADAPTER + "forward", "gate not tanh'd",
      ("gate = torch.tanh(self.gate) if self.gate_tanh else self.gate", "gate = self.gate")),
    m("adapter_gate_always_tanh", 8, ADAPTER + "forward", "tanh applied although gate_tanh is False",
      ("gate = torch.tanh(self.gate) if self.gate_tanh else self.gate", "gate = torch.tanh(self.gate)")),
    m("adapter_gate_averaged", 8, ADAPTER + "forward", "one scalar gate instead of per head",
      ("return gate * (weights @ v)", "return gate.mean() * (weights @ v)")),
    m("adapter_scores_over_d", 8, ADAPTER + "forward", "divided by d instead of √d",
      ("/ math.sqrt(self.head_dim)", "/ self.head_dim")),
    m("adapter_softmax_axis", 8, ADAPTER + "forward", "softmax over the wrong axis",
      ("dim=-1).type_as(q)", "dim=-2).type_as(q)")),
]
