"""Lab 13, the multimodal LLaMA-Adapter: the mistakes students make in ``VisualProjection`` and
``AdapterPrompt.add_image``, and the inputs that show them."""

from types import SimpleNamespace

import torch

from ..mutations import m
from . import EXACT_BF16, Case, generator, randn

PROJECTION = "llama_min/peft/adapter.py::VisualProjection."
ADD = "llama_min/peft/adapter.py::AdapterPrompt.add_image"
NORMED = "return self.norm(self.net(features.to(self.norm.weight.dtype)))"
SUM = "return k + vk, v + vv"
VK = "vk = wk(visual).view(B, self.n_kv_heads, 1, self.head_dim).repeat_interleave(groups, dim=1)"
VV = "vv = wv(visual).view(B, self.n_kv_heads, 1, self.head_dim).repeat_interleave(groups, dim=1)"
EVERY_PROMPT = ("I_p is repeated over the K prompt positions: every prompt gets the image, P_b = P + I_p[b], so add "
                "the (B, H, 1, d) image keys/values to all K prompt keys/values (broadcasting does the repeat)")
THROUGH = ("the image is added to the prompts P (B, dim), before the frozen projections: the keys and values of "
           "P + I_p are wk(P) + wk(I_p) and wv(P) + wv(I_p)")
REPEAT = "query head h reads kv head h // (H / H_kv): .repeat_interleave(groups, dim=1), as in prompt_kv"

MUTATIONS = [
    m("projection_relu", 13, PROJECTION + "__init__", "ReLU instead of SiLU between the two linear layers",
      ("nn.SiLU()", "nn.ReLU()"), why="with a hidden width the projection is Linear, SiLU, Linear, then LayerNorm"),
    m("projection_hidden_ignored", 13, PROJECTION + "__init__", "the hidden width is ignored",
      ("if hidden:", "if False:"),
      why="hidden > 0 asks for two linear layers, Linear(in_dim, hidden), SiLU, Linear(hidden, dim), as self.net "
          "(an nn.Sequential); hidden = 0 for one Linear(in_dim, dim)"),
    m("projection_dtype_ignored", 13, PROJECTION + "__init__", "create the layers with the given device and dtype",
      ("factory = dict(device=device, dtype=dtype)", "factory = dict(device=device)"),
      why="a bfloat16 model gets a bfloat16 projection"),
    m("projection_no_norm", 13, PROJECTION + "forward", "the projection's output is not layer-normalised",
      (NORMED, "return self.net(features.to(self.norm.weight.dtype))"),
      why="end with self.norm (LayerNorm): I_p is added to prompts drawn from N(0, 1) and must have their unit scale"),
    m("projection_not_zero_safe", 13, PROJECTION + "forward", "projection not zero-safe",
      (NORMED, "y = self.net(features.to(self.norm.weight.dtype))\n        return (y - y.mean(-1, keepdim=True)) / "
               "y.std(-1, unbiased=False, keepdim=True) * self.norm.weight + self.norm.bias"),
      why="a constant vector (zero features through a projection whose bias is zero) has variance 0: without "
          "LayerNorm's eps under the square root it gives 0/0 = NaN, and 0 · NaN = NaN gets past even a closed gate"),
    m("projection_features_not_cast", 13, PROJECTION + "forward", "features not cast to the projection's dtype",
      ("features.to(self.norm.weight.dtype)", "features"),
      why="an encoder gives float32 features; a bfloat16 projection needs them in bfloat16 (.to(its dtype))"),
    m("projection_detached", 13, PROJECTION + "forward", "the projection gets no gradient",
      (NORMED, "return self.norm(self.net(features.to(self.norm.weight.dtype))).detach()"),
      why="the projection is trained: keep its output in the autograd graph (no .detach(), no torch.no_grad())"),
    m("image_first_prompt_only", 13, ADD, "the image is added to the first prompt only",
      (SUM, "return torch.cat([k[:, :, :1] + vk, k[:, :, 1:].expand(B, -1, -1, -1)], dim=2), "
            "torch.cat([v[:, :, :1] + vv, v[:, :, 1:].expand(B, -1, -1, -1)], dim=2)"), why=EVERY_PROMPT),
    m("image_extra_prompt", 13, ADD, "the image is appended as an extra prompt",
      (SUM, "return torch.cat([k.expand(B, -1, -1, -1), vk], dim=2), torch.cat([v.expand(B, -1, -1, -1), vv], dim=2)"),
      why=EVERY_PROMPT),
    m("image_spread_over_prompts", 13, ADD, "the image is divided among the K prompts",
      (SUM, "return k + vk / k.shape[2], v + vv / v.shape[2]"), why=EVERY_PROMPT),
    m("image_values_only", 13, ADD, "the image is added to the keys only or the values only",
      (SUM, "return k.expand(B, -1, -1, -1), v + vv"),
      why="the prompts P + I_p give both the keys wk(P + I_p) and the values wv(P + I_p)"),
    m("image_kv_swapped", 13, ADD, "the image's keys and values swapped",
      ("vk = wk(visual)", "vk = wv(visual)"), ("vv = wv(visual)", "vv = wk(visual)"),
      why="keys come from wk, values from wv"),
    m("image_not_projected", 13, ADD, "the image is added to the keys and values instead of to the prompts",
      (VK, "vk = visual.view(B, self.n_heads, 1, self.head_dim)"),
      (VV, "vv = visual.view(B, self.n_heads, 1, self.head_dim)"), why=THROUGH),
    m("image_gqa_repeat", 13, ADD, "GQA with repeat instead of repeat_interleave",
      (VK, "vk = wk(visual).view(B, self.n_kv_heads, 1, self.head_dim).repeat(1, groups, 1, 1)"),
      (VV, "vv = wv(visual).view(B, self.n_kv_heads, 1, self.head_dim).repeat(1, groups, 1, 1)"), why=REPEAT),
    m("image_kv_not_repeated", 13, ADD, "the kv heads are not repeated",
      (VK, "vk = wk(visual).view(B, self.n_kv_heads, 1, self.head_dim)"),
      (VV, "vv = wv(visual).view(B, self.n_kv_heads, 1, self.head_dim)"), why=REPEAT),
    m("image_detached", 13, ADD, "the image gets no gradient",
      ("vk = wk(visual)", "vk = wk(visual.detach())"), ("vv = wv(visual)", "vv = wv(visual.detach())"),
      why="the loss must reach the projection through the image: no .detach()"),
]

C_V, DIM, HIDDEN, H, H_KV, K, B = 12, 32, 20, 4, 2, 6, 3
D = DIM // H
PARAMS = {"in_dim": C_V, "dim": DIM}


def adapter_standin() -> SimpleNamespace:
    """What add_image may read of its AdapterPrompt: the head counts and the head width (the rest of the class is
    lab 8's)."""
    return SimpleNamespace(n_heads=H, n_kv_heads=H_KV, head_dim=D)


def projection(code, t, hidden: int, dtype=torch.float32):
    proj = code.VisualProjection(C_V, DIM, hidden, dtype=dtype)
    proj.load_state_dict({name.removeprefix("state."): value for name, value in t.items() if name.startswith("state.")})
    return proj(t["features"])


def add_image(code, t):
    wk, wv = (torch.nn.Linear(DIM, H_KV * D, bias=False) for _ in range(2))
    wk.weight.copy_(t["wk"])
    wv.weight.copy_(t["wv"])
    return code.AdapterPrompt.add_image(adapter_standin(), t["k"], t["v"], wk, wv, t["visual"])


def state(g: torch.Generator, hidden: int) -> dict[str, torch.Tensor]:
    if hidden:
        net = {"net.0.weight": randn(g, hidden, C_V, std=C_V ** -0.5), "net.0.bias": randn(g, hidden, std=0.1),
               "net.2.weight": randn(g, DIM, hidden, std=hidden ** -0.5), "net.2.bias": randn(g, DIM, std=0.1)}
    else:
        net = {"net.weight": randn(g, DIM, C_V, std=C_V ** -0.5), "net.bias": randn(g, DIM, std=0.1)}
    norm = {"norm.weight": 1 + randn(g, DIM, std=0.2), "norm.bias": randn(g, DIM, std=0.2)}
    return {f"state.{k}": v for k, v in (net | norm).items()}


def cases():
    g = generator(13)
    features = randn(g, B, C_V, std=2.0).abs()  # an encoder's features after its ReLU
    for hidden, name in ((0, "linear"), (HIDDEN, "hidden")):
        yield Case(f"projection.{name}", {"features": features} | state(g, hidden),
                   lambda code, t, hidden=hidden: projection(code, t, hidden), params=PARAMS | {"hidden": hidden},
                   hint="LayerNorm(Linear(features))" if not hidden else "LayerNorm(Linear(SiLU(Linear(features))))")
    bf16 = {"features": features} | {k: v.bfloat16() for k, v in state(g, 0).items()}
    yield Case("projection.bfloat16", bf16, lambda code, t: projection(code, t, 0, torch.bfloat16),
               params=PARAMS | {"hidden": 0, "dtype": "bfloat16"}, tol=EXACT_BF16,
               hint="float32 features, a bfloat16 projection: cast the features to its dtype, return its dtype",
               dtype_cause="Return the projection's dtype (bfloat16 here): cast the features to it first.")
    blank = state(g, 0) | {"state.net.bias": torch.zeros(DIM)}
    yield Case("projection.zero", {"features": torch.zeros(B, C_V)} | blank, lambda code, t: projection(code, t, 0),
               params=PARAMS | {"hidden": 0},
               hint="zero features through a bias-free Linear give a zero vector; LayerNorm (with its eps) maps it to "
                    "its bias")
    inputs = {"k": randn(g, 1, H, K, D), "v": randn(g, 1, H, K, D), "visual": randn(g, B, DIM),
              "wk": randn(g, H_KV * D, DIM, std=DIM ** -0.5), "wv": randn(g, H_KV * D, DIM, std=DIM ** -0.5)}
    yield Case("add_image", inputs, add_image, params={"n_heads": H, "n_kv_heads": H_KV, "head_dim": D},
               hint="k + wk(I_p), v + wv(I_p), each image key/value (B, H_kv, 1, d) repeated to the query heads and "
                    "added to all K prompt keys/values",
               shape_causes={str([B, H, K + 1, D]): "the image is appended as an extra prompt: " + EVERY_PROMPT,
                             str([1, H, K, D]): "the image is added to the keys only or the values only: the prompts "
                                                "P + I_p give both the keys and the values"})
