"""Lab 3, rotary position embeddings: the mistakes students make in ``RotaryEmbedding.inv_freq``,
``RotaryEmbedding.forward`` and ``apply_rotary``, and the inputs that show them."""

import math

import torch

from llama_min.config import RopeScaling

from ..mutations import m
from . import EXACT_BF16, Case, generator, randn

INV_FREQ = "llama_min/rope.py::RotaryEmbedding.inv_freq"
COS_SIN, ROTATE = "llama_min/rope.py::RotaryEmbedding.forward", "llama_min/rope.py::apply_rotary"
ROTATION = "(x[2i], x[2i+1]) -> (x[2i] cos − x[2i+1] sin, x[2i] sin + x[2i+1] cos)"
LLAMA31 = RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=64)

MUTATIONS = [
    m("rope_halves", 3, ROTATE, "rotating halves (GPT-NeoX",
      ("x.float().unflatten(-1, (-1, 2))", "x.float().unflatten(-1, (2, -1)).transpose(-1, -2)"),
      ("rotated.flatten(-2)", "rotated.transpose(-1, -2).flatten(-2)"),
      why="Hugging Face style, pairs (i, i + d/2)); LLaMA rotates adjacent pairs (2i, 2i+1)"),
    m("rope_i_over_d", 3, INV_FREQ, "θ^(−i/d) instead of θ^(−2i/d)",
      ("torch.arange(0, self.head_dim, 2, device=device)", "torch.arange(0, self.head_dim // 2, device=device)"),
      why="θ_i = theta^(−2i/d) for i = 0 … d/2 − 1 (torch.arange(0, d, 2) / d)"),
    m("rope_positive_exponent", 3, INV_FREQ, "the exponent has the wrong sign", ("(-torch.arange", "(torch.arange"),
      why="θ_i = theta^(−2i/d) shrinks with i (the first pair turns fastest)"),
    m("rope_scaling_ignored", 3, INV_FREQ, "the model's RoPE scaling is ignored",
      ("return inv_freq if self.scaling is None else scaled_frequencies(inv_freq, self.scaling)", "return inv_freq"),
      why="when self.scaling is set (Llama 3.1's long context), return scaled_frequencies(inv_freq, self.scaling)"),
    m("rope_rotation_sign", 3, ROTATE, "rotation in the wrong direction",
      ("even * cos - odd * sin, even * sin + odd * cos", "even * cos + odd * sin, -even * sin + odd * cos"),
      why="(by −mθ): " + ROTATION + " rotates by +mθ"),
    m("rope_apply_cos_sin_swapped", 3, ROTATE, "cos and sin swapped",
      ("even * cos - odd * sin, even * sin + odd * cos", "even * sin - odd * cos, even * cos + odd * sin"),
      why=ROTATION),
    m("rope_pair_swapped", 3, ROTATE, "the two features of a pair are swapped",
      ("even, odd = pairs[..., 0], pairs[..., 1]", "odd, even = pairs[..., 0], pairs[..., 1]"),
      why="feature 2i is the first of its pair, 2i+1 the second: " + ROTATION),
    m("rope_in_bf16", 3, ROTATE, "rotated in bfloat16",
      ("cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)",
       "cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)"),
      ("x.float().unflatten", "x.unflatten"),
      why="compute the rotation in float32 (x.float(), cos and sin as given) and cast back at the end"),
    m("rope_not_cast_back", 3, ROTATE, "not cast back to x's dtype", ("rotated.flatten(-2).type_as(x)",
                                                                      "rotated.flatten(-2)"),
      why="the rotation runs in float32; return it in x's dtype (.type_as(x))"),
    m("rope_cos_sin_swapped", 3, COS_SIN, "cos and sin swapped",
      ("return angles.cos(), angles.sin()", "return angles.sin(), angles.cos()"), why="return (cos, sin)"),
    m("rope_positions_from_one", 3, COS_SIN, "positions counted from 1",
      ("positions.float()[..., None]", "(positions.float()[..., None] + 1)"),
      why="the first token has position 0"),
    m("rope_positions_ignored", 3, COS_SIN, "the positions given are ignored",
      ("positions.float()[..., None]", "torch.arange(positions.shape[-1], device=positions.device).float()[:, None]"),
      why="with left padding each row has its own positions (B, T); use them, not 0 … T − 1"),
    m("rope_angles_duplicated", 3, COS_SIN, "angles duplicated to d features (Hugging Face's layout)",
      ("angles = positions.float()[..., None] * self.inv_freq(positions.device)",
       "angles = positions.float()[..., None] * self.inv_freq(positions.device)\n"
       "        angles = torch.cat((angles, angles), dim=-1)"),
      why="cos and sin have one column per PAIR: (T, d/2)"),
]


def inv_freq_case(d: int, theta: float, scaling=None) -> Case:
    def run(code, t):
        return code.RotaryEmbedding(d, theta, scaling).inv_freq(torch.device("cpu"))
    name = f"inv_freq.d{d}" + ("" if scaling is None else "_scaled")
    params = {"head_dim": d, "theta": theta} | ({} if scaling is None else {"scaling": vars(scaling)})
    return Case(name, {}, run, params=params,
                hint="θ_i = theta^(−2i/d), i = 0 … d/2 − 1, float32" + (
                    "; then scaled_frequencies(θ, self.scaling) when the model has RoPE scaling" if scaling else ""),
                dtype_cause="The frequencies are float32 (torch.arange(...).float()).",
                shape_causes={str([d]): "one frequency per feature; RoPE has one per PAIR of features: d/2 of them"})


def rotary_case(name: str, x, cos, sin, **meta) -> Case:
    return Case(name, {"x": x, "cos": cos, "sin": sin}, lambda code, t: code.apply_rotary(t["x"], t["cos"], t["sin"]),
                **meta)


def cases():
    g = generator(3)
    yield inv_freq_case(16, 10000.0)
    yield inv_freq_case(10, 500000.0)
    yield inv_freq_case(32, 500000.0, LLAMA31)
    batched = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]])  # row 1 left-padded by 2
    for name, positions in (("positions", torch.arange(7)), ("batched", batched)):
        yield Case(f"forward.{name}", {"positions": positions},
                   lambda code, t: code.RotaryEmbedding(16, 10000.0)(t["positions"]),
                   params={"head_dim": 16, "theta": 10000.0},
                   hint="angles = positions[..., None] · θ (outer product), then their cos and sin, float32",
                   shape_causes={str([8, positions.shape[-1]]): "angles laid out (d/2, T); they are (T, d/2): "
                                 "positions[..., None] * θ"})
    x = randn(g, 2, 6, 4, 16)
    angles = (torch.rand(6, 8, generator=g) * 2 - 1) * math.pi  # every pair turns by a sizeable angle
    yield rotary_case("apply_rotary.float32", x, angles.cos(), angles.sin(),
                      hint=ROTATION + ", the same angles for every head", dtype_cause="Return x's dtype.")
    angles = (torch.rand(2, 6, 8, generator=g) * 2 - 1) * math.pi  # a different position per row (left padding)
    yield rotary_case("apply_rotary.batched", x, angles.cos(), angles.sin(),
                      hint="cos, sin (B, T, d/2) broadcast over the heads axis: (B, T, 1, d/2)")
    x = randn(g, 2, 6, 4, 64).bfloat16()
    angles = (torch.rand(6, 32, generator=g) * 2 - 1) * math.pi
    yield rotary_case("apply_rotary.bfloat16", x, angles.cos(), angles.sin(), tol=EXACT_BF16,
                      dtype_cause="Rotate in float32, then cast back to x's dtype (x.dtype).")
