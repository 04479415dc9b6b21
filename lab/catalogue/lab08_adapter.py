"""Lab 8, LLaMA-Adapter: the mistakes students make in ``AdapterPrompt`` and the inputs that show them."""

import torch
from torch import nn

from ..mutations import m
from . import EXACT_BF16, Case, generator, randn

ADAPTER = "llama_min/peft/adapter.py::AdapterPrompt."
REPEAT = "query head h reads kv head h // (H / H_kv): k.repeat_interleave(groups, dim=0)"
GATED = "return gate * (weights @ v)"
GRAD = ("the loss must reach the gates, and the prompts once a gate is open: no .detach(), both nn.Parameters that "
        "require grad")

MUTATIONS = [
    m("adapter_gate_not_zero", 8, ADAPTER + "__init__", "adapter gate not zero",
      ("torch.zeros(1, n_heads, 1, 1", "torch.ones(1, n_heads, 1, 1"),
      why="zero-init attention starts every gate at 0, so the adapted model is exactly the base model"),
    m("adapter_scalar_gate", 8, ADAPTER + "__init__", "one scalar gate instead of per head",
      ("torch.zeros(1, n_heads, 1, 1", "torch.zeros(1, 1, 1, 1"), why="the gate has shape (1, n_heads, 1, 1)"),
    m("adapter_prompts_zero", 8, ADAPTER + "__init__", "prompts initialised to zero",
      ("torch.randn(adapter_len, dim", "torch.zeros(adapter_len, dim"),
      why="draw them from N(0, 1): with zero prompts every prompt key is equal and the softmax is uniform"),
    m("adapter_prompts_small", 8, ADAPTER + "__init__", "draw them from N(0, 1)",
      ("torch.randn(adapter_len, dim, device=device, dtype=dtype)",
       "0.02 * torch.randn(adapter_len, dim, device=device, dtype=dtype)"),
      why="wk and wv expect inputs of RMS-normalised scale"),
    m("adapter_gate_frozen", 8, ADAPTER + "__init__", "the gate gets no gradient",
      ("self.gate = nn.Parameter(torch.zeros(1, n_heads, 1, 1, device=device, dtype=dtype))",
       "self.gate = nn.Parameter(torch.zeros(1, n_heads, 1, 1, device=device, dtype=dtype), requires_grad=False)"),
      why=GRAD),
    m("adapter_dtype_ignored", 8, ADAPTER + "__init__", "create both with the given device and dtype",
      ("torch.randn(adapter_len, dim, device=device, dtype=dtype)", "torch.randn(adapter_len, dim, device=device)"),
      ("torch.zeros(1, n_heads, 1, 1, device=device, dtype=dtype)", "torch.zeros(1, n_heads, 1, 1, device=device)"),
      why="a bfloat16 model gets bfloat16 prompts and gates"),
    m("adapter_gqa_repeat", 8, ADAPTER + "prompt_kv", "GQA with repeat instead of repeat_interleave",
      ("k = k.repeat_interleave(groups, dim=0)[None]", "k = k.repeat(groups, 1, 1)[None]"),
      ("v = v.repeat_interleave(groups, dim=0)[None]", "v = v.repeat(groups, 1, 1)[None]"), why=REPEAT),
    m("adapter_kv_not_repeated", 8, ADAPTER + "prompt_kv", "the kv heads are not repeated",
      ("k = k.repeat_interleave(groups, dim=0)[None]", "k = k[None]"),
      ("v = v.repeat_interleave(groups, dim=0)[None]", "v = v[None]"), why=REPEAT),
    m("adapter_kv_swapped", 8, ADAPTER + "prompt_kv", "keys and values swapped",
      ("k = wk(self.prompt)", "k = wv(self.prompt)"), ("v = wv(self.prompt)", "v = wk(self.prompt)"),
      why="keys come from wk, values from wv"),
    m("adapter_prompt_rotated", 8, ADAPTER + "prompt_kv", "adapter prompts given rotary positions",
      ("k = wk(self.prompt).view(K, self.n_kv_heads, self.head_dim).transpose(0, 1)",
       "from llama_min.rope import RotaryEmbedding, apply_rotary\n"
       "        cos, sin = RotaryEmbedding(self.head_dim, 10000.0)(torch.arange(K))\n"
       "        k = apply_rotary(wk(self.prompt).view(1, K, self.n_kv_heads, self.head_dim), cos, sin)[0]"
       ".transpose(0, 1)"),
      why="the prompts have no position: their keys are not rotated"),
    m("adapter_prompt_detached", 8, ADAPTER + "prompt_kv", "the prompt gets no gradient",
      ("k = wk(self.prompt)", "k = wk(self.prompt.detach())"), ("v = wv(self.prompt)", "v = wv(self.prompt.detach())"),
      why=GRAD),
    m("adapter_tanh_always", 8, ADAPTER + "forward", "tanh applied although gate_tanh is False",
      ("gate = torch.tanh(self.gate) if self.gate_tanh else self.gate", "gate = torch.tanh(self.gate)"),
      why="the paper multiplies by the gate itself; tanh only with gate_tanh=True"),
    m("adapter_no_tanh", 8, ADAPTER + "forward", "gate not tanh'd although gate_tanh asks for it",
      ("gate = torch.tanh(self.gate) if self.gate_tanh else self.gate", "gate = self.gate"),
      why="the factor is tanh(gate) with gate_tanh=True (the official code), the gate itself otherwise (the paper)"),
    m("adapter_gate_averaged", 8, ADAPTER + "forward", "one scalar gate instead of per head",
      (GATED, "return gate.mean() * (weights @ v)"), why="each head h has its own gate, broadcast over (B, H, T, d)"),
    m("adapter_no_gate", 8, ADAPTER + "forward", "the gate is not applied", (GATED, "return weights @ v"),
      why="zero-init attention multiplies the prompt attention by the (zero-initialised) gate"),
    m("adapter_gate_detached", 8, ADAPTER + "forward", "the gate gets no gradient",
      (GATED, "return gate.detach() * (weights @ v)"), why=GRAD),
    m("adapter_scores_over_d", 8, ADAPTER + "forward", "divided by d instead of √d",
      ("/ math.sqrt(self.head_dim)", "/ self.head_dim"), why="scores are q kᵀ / sqrt(d)"),
    m("adapter_scaled_by_prompt_len", 8, ADAPTER + "forward", "scaled by √K instead of √d",
      ("/ math.sqrt(self.head_dim)", "/ math.sqrt(k.shape[-2])"),
      why="scores are q kᵀ / sqrt(d), d the head dimension"),
    m("adapter_softmax_axis", 8, ADAPTER + "forward", "softmax over the wrong axis",
      ("dim=-1).type_as(q)", "dim=-2).type_as(q)"), why="each query's weights sum to 1 over the K prompts (dim=-1)"),
    m("adapter_softmax_in_input_dtype", 8, ADAPTER + "forward", "softmax in bfloat16",
      ("F.softmax(scores.float(), dim=-1)", "(scores.exp() / scores.exp().sum(dim=-1, keepdim=True))"),
      why="exponentials summed in bfloat16 keep 8 bits; take the softmax in float32 (F.softmax(scores.float(), "
          "dim=-1)) and cast the weights back (.type_as(q))"),
]

DIM, H, H_KV, K = 32, 4, 2, 6
PARAMS = {"adapter_len": K, "dim": DIM, "n_heads": H, "n_kv_heads": H_KV}


def loaded(code, t, gate_tanh=False):
    dtype = t["prompt"].dtype
    wk, wv = (nn.Linear(DIM, H_KV * DIM // H, bias=False).to(dtype) for _ in range(2))
    wk.weight.copy_(t["wk"])
    wv.weight.copy_(t["wv"])
    adapter = code.AdapterPrompt(t["prompt"].shape[0], DIM, H, H_KV, gate_tanh, dtype=dtype)
    adapter.prompt.copy_(t["prompt"])
    if "gate" in t:
        adapter.gate.copy_(t["gate"])
    return adapter, wk, wv


def prompt_kv(code, t):
    adapter, wk, wv = loaded(code, t)
    return adapter.prompt_kv(wk, wv)


def forward(code, t, gate_tanh):
    adapter, wk, wv = loaded(code, t, gate_tanh)
    return adapter(t["q"], wk, wv)


def cases():
    g = generator(8)
    d = DIM // H
    inputs = {"prompt": randn(g, K, DIM), "wk": randn(g, H_KV * d, DIM, std=DIM ** -0.5),
              "wv": randn(g, H_KV * d, DIM, std=DIM ** -0.5)}
    yield Case("prompt_kv", inputs, prompt_kv, params=PARAMS,
               hint="wk(P), wv(P) viewed (K, H_kv, d), no rotary, (H_kv, K, d), kv head h // groups for query head h",
               shape_causes={str([1, H_KV, K, d]): "the kv heads are not repeated for the query heads: "
                             "(1, n_heads, K, d), kv head h // (n_heads / n_kv_heads) for query head h"})
    inputs |= {"q": randn(g, 2, H, 5, d, std=1.5), "gate": torch.tensor([0.5, -1.0, 2.0, 0.25]).view(1, H, 1, 1)}
    for gate_tanh in (False, True):
        yield Case(f"forward.{'tanh' if gate_tanh else 'plain'}", inputs,
                   lambda code, t, gate_tanh=gate_tanh: forward(code, t, gate_tanh),
                   params=PARAMS | {"gate_tanh": gate_tanh},
                   hint="gate · softmax(q P_kᵀ / sqrt(d)) P_v, the gate per head" +
                        (", tanh(gate) with gate_tanh" if gate_tanh else ""))
    # bfloat16, many prompts and large scores: the softmax must run in float32
    big = {"prompt": randn(g, 48, DIM, std=3.0).bfloat16(), "wk": inputs["wk"].bfloat16(),
           "wv": inputs["wv"].bfloat16(), "q": randn(g, 2, H, 5, d, std=3.0).bfloat16(),
           "gate": inputs["gate"].bfloat16()}
    yield Case("forward.bfloat16", big, lambda code, t: forward(code, t, False), params=PARAMS | {
        "adapter_len": 48, "gate_tanh": False}, tol=EXACT_BF16,
        hint="gate · softmax(q P_kᵀ / sqrt(d)) P_v with the softmax in float32, the result in q's dtype",
        dtype_cause="Return q's dtype: the softmax runs in float32, its weights are cast back (.type_as(q)).")

