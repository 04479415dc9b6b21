"""Lab 7, LoRA: the mistakes students make in ``LoRALinear`` and the inputs that show them."""

import torch
from torch import nn

from ..mutations import m
from . import EXACT_BF16, Case, generator, randn

LORA = "llama_min/peft/lora.py::LoRALinear."
LOW_RANK = "F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b)"
DELTA = "ΔW = (alpha / r)·B A"
GRAD = "the loss must reach A and B: no .detach(), no torch.no_grad(), both nn.Parameters that require grad"

MUTATIONS = [
    m("lora_b_random", 7, LORA + "__init__", "LoRA B random",
      ("torch.zeros(self.out_features, rank, **factory)", "torch.randn(self.out_features, rank, **factory)"),
      why="B starts at zeros, so that B A = 0 and the adapted layer starts as exactly the frozen one"),
    m("lora_scale_alpha", 7, LORA + "__init__", "scaled by α instead of α/r",
      ("self.scale = alpha / rank", "self.scale = alpha"), why=DELTA),
    m("lora_scale_r_over_alpha", 7, LORA + "__init__", "scaled by r/α", ("self.scale = alpha / rank",
                                                                         "self.scale = rank / alpha"), why=DELTA),
    m("lora_weight_copied", 7, LORA + "__init__", "the frozen weight is copied",
      ("self.weight = base.weight", "self.weight = nn.Parameter(base.weight.detach().clone())"),
      why="share the Parameter (self.weight = base.weight): a tied output head stays tied, no memory is doubled"),
    m("lora_a_zero", 7, LORA + "__init__", "A initialised to zeros",
      ("nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))", "nn.init.zeros_(self.lora_a)"),
      why="with B = 0 as well, neither ever gets a gradient"),
    m("lora_a_gaussian", 7, LORA + "__init__", "nn.Linear's initialisation",
      ("nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))", "nn.init.normal_(self.lora_a)"),
      why="A is initialised like nn.Linear's weight: kaiming_uniform_ with a = sqrt(5)"),
    m("lora_a_frozen", 7, LORA + "__init__", "lora_a gets no gradient",
      ("self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, **factory))",
       "self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, **factory), requires_grad=False)"), why=GRAD),
    m("lora_b_frozen", 7, LORA + "__init__", "lora_b gets no gradient",
      ("self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, **factory))",
       "self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, **factory), requires_grad=False)"), why=GRAD),
    m("lora_params_float32", 7, LORA + "__init__", "create them with the weight's device and dtype",
      ("factory = dict(device=base.weight.device, dtype=base.weight.dtype)",
       "factory = dict(device=base.weight.device)"), why="A and B follow the frozen weight"),
    m("lora_delta_not_scaled", 7, LORA + "delta_weight", "the update is not scaled", ("self.scale * ", ""), why=DELTA),
    m("lora_delta_in_bf16", 7, LORA + "delta_weight", "the update is not float32",
      ("self.lora_b.float() @ self.lora_a.float()", "self.lora_b @ self.lora_a"),
      why="compute B A in float32 (.float()) whatever the weights' dtype: merging rounds once, at the end"),
    m("lora_delta_transposed", 7, LORA + "delta_weight", "the update is transposed",
      ("self.lora_b.float() @ self.lora_a.float()", "self.lora_a.float().T @ self.lora_b.float().T"),
      why="B A is (out, r)·(r, in) = (out, in), the shape of W"),
    m("lora_merged_counted_twice", 7, LORA + "forward", "counted twice", ("if self.merged:", "if False:"),
      why="after merge() B A is inside W: return W x alone"),
    m("lora_forward_not_scaled", 7, LORA + "forward", "the low-rank path is not scaled", (" * self.scale", ""),
      why=DELTA),
    m("lora_forward_no_base", 7, LORA + "forward", "the frozen path W x is missing",
      ("return y + " + LOW_RANK, "return " + LOW_RANK), why="y = W x + (alpha / r)·B A x"),
    m("lora_dropout_everywhere", 7, LORA + "forward", "dropout belongs on the input of the low-rank path only",
      ("y = F.linear(x, self.weight)", "x = self.dropout(x)\n        y = F.linear(x, self.weight)"),
      why="W x is never dropped"),
    m("lora_update_detached", 7, LORA + "forward", "the update gets no gradient",
      (LOW_RANK, LOW_RANK + ".detach()"), why=GRAD),
    m("lora_a_detached", 7, LORA + "forward", "lora_a gets no gradient",
      ("self.lora_a)", "self.lora_a.detach())"), why=GRAD),
    m("lora_full_matrix", 7, LORA + "forward", "builds the full (out, in) matrix",
      (LOW_RANK, "F.linear(self.dropout(x), self.lora_b @ self.lora_a)"),
      why="two thin matmuls, (x Aᵀ) Bᵀ, cost r·(in + out) per token; B A costs out·in memory and time"),
    m("lora_forward_uses_delta_weight", 7, LORA + "forward", "builds the full (out, in) matrix",
      (LOW_RANK + " * self.scale", "F.linear(self.dropout(x), self.delta_weight().to(x.dtype))"),
      why="during training apply A, then B: (x Aᵀ) Bᵀ; delta_weight() is for merging"),
    m("lora_merged_twice", 7, LORA + "merge", "LoRA merged twice", ("if not self.merged:", "if True:"),
      why="merge() must do nothing when already merged"),
    m("lora_merge_flag_not_set", 7, LORA + "merge", "self.merged is not True", ("self.merged = True", "pass"),
      why="after merge() set self.merged = True, so that forward stops adding the low-rank path"),
    m("lora_merge_rounds_twice", 7, LORA + "merge", "merged in bfloat16",
      ("self.weight.float() + self.delta_weight()", "self.weight + self.delta_weight().to(self.weight.dtype)"),
      why="add in float32 (self.weight.float() + delta) and round once when copying into W"),
    m("lora_unmerge_adds", 7, LORA + "unmerge", "unmerge adds the update",
      ("self.weight.float() - self.delta_weight()", "self.weight.float() + self.delta_weight()"),
      why="it subtracts it"),
    m("lora_unmerged_twice", 7, LORA + "unmerge", "LoRA unmerged twice", ("if self.merged:", "if True:"),
      why="unmerge() must do nothing unless merged"),
    m("lora_unmerge_keeps_update", 7, LORA + "unmerge", "unmerge leaves the update in W",
      ("self.weight.copy_(self.weight.float() - self.delta_weight())", "pass"), why="W <- W − (alpha / r)·B A"),
]

N_IN, N_OUT, RANK, ALPHA = 24, 40, 4, 8.0
PARAMS = {"in": N_IN, "out": N_OUT, "rank": RANK, "alpha": ALPHA}


def wrapped(code, t):
    base = nn.Linear(N_IN, N_OUT, bias=False).to(t["W"].dtype)
    base.weight.copy_(t["W"])
    lora = code.LoRALinear(base, RANK, ALPHA, 0.0)
    lora.lora_a.copy_(t["A"])
    lora.lora_b.copy_(t["B"])
    return lora


def merged(code, t, unmerge=False):
    lora = wrapped(code, t)
    lora.merge()
    lora.merge()
    if unmerge:
        lora.unmerge()
        lora.unmerge()
    return lora


def cases():
    g = generator(7)
    W = randn(g, N_OUT, N_IN, std=N_IN ** -0.5)
    A, B = randn(g, RANK, N_IN, std=N_IN ** -0.5), randn(g, N_OUT, RANK, std=0.5)
    x = randn(g, 3, 5, N_IN)
    inputs = {"W": W, "A": A, "B": B}
    yield Case("delta_weight", inputs, lambda code, t: wrapped(code, t).delta_weight(), params=PARAMS,
               hint="(alpha / r)·B A, float32 (out, in)", dtype_cause="Return the update in float32.",
               shape_causes={str([N_IN, N_IN]): "Aᵀ B has shape (in, in); the update is B A, "
                                                "(out, r)·(r, in) = (out, in)"})
    bf16 = {k: v.bfloat16() for k, v in inputs.items()}
    yield Case("delta_weight.bfloat16", bf16, lambda code, t: wrapped(code, t).delta_weight(), params=PARAMS,
               hint="(alpha / r)·B A computed in float32 from bfloat16 A and B",
               dtype_cause="Return the update in float32 whatever the weights' dtype (.float() before the product).")
    yield Case("forward", inputs | {"x": x}, lambda code, t: wrapped(code, t)(t["x"]), params=PARAMS,
               hint="W x + (alpha / r)·B A x")
    yield Case("merge", inputs, lambda code, t: merged(code, t).weight, params=PARAMS,
               hint="W <- W + (alpha / r)·B A, once")
    yield Case("merge.bfloat16", bf16, lambda code, t: merged(code, t).weight, params=PARAMS, tol=EXACT_BF16,
               hint="W <- W + (alpha / r)·B A, added in float32 and rounded once into the bfloat16 W")
    yield Case("merged_forward", inputs | {"x": x}, lambda code, t: merged(code, t)(t["x"]), params=PARAMS,
               hint="after merge() the update is inside W: the forward is W x alone")
    yield Case("unmerge", inputs, lambda code, t: merged(code, t, unmerge=True).weight, params=PARAMS,
               hint="W <- W − (alpha / r)·B A, once")
