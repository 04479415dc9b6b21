"""Lab 12, weight-only quantisation: the mistakes students make in ``quantize_int8``, ``dequantize_int8``,
``quantize_int4`` and ``dequantize_int4`` (llama_min/quantize.py) and the inputs that show them."""

import torch

from ..mutations import m
from . import Case, generator, randn

Q8 = "llama_min/quantize.py::quantize_int8"
D8 = "llama_min/quantize.py::dequantize_int8"
Q4 = "llama_min/quantize.py::quantize_int4"
D4 = "llama_min/quantize.py::dequantize_int4"
INT8 = "int8 per output channel: s_n = max_k |W_nk| / 127, q = round(W / s_n)"
INT4 = "int4: s = (max - min) / 15 per group, z = min + 8 s, q = round((W - z) / s) + 8, W ≈ (q - 8) s + z"

MUTATIONS = [
    m("int8_per_tensor_scale", 12, Q8, "one scale for the whole matrix",
      ("w.float().abs().amax(dim=1)", "w.float().abs().amax().expand(w.shape[0])"),
      why="each output channel (row) gets its own scale, so one large row does not coarsen the others; " + INT8),
    m("int8_unsigned_range", 12, Q8, "the scale spreads max |W| over 255 steps",
      ("/ 127", "/ 255"), why="int8 is signed: max |W| maps to ±127, so s = max |W| / 127"),
    m("int8_truncates", 12, Q8, "the codes are truncated, not rounded", ("torch.round(", "torch.trunc("),
      why="round to the nearest code: truncation biases every weight toward zero by up to one step"),
    m("int8_dequant_divides", 12, D8, "dequantisation divides by the scale", ("* scales", "/ scales"),
      why="W ≈ q · s: the codes are multiplied by their row's scale"),
    m("int4_fifteen_steps", 12, Q4, "16 steps instead of 15 between min and max", ("/ 15", "/ 16"),
      why="16 levels span the range with 15 steps: s = (max - min) / 15; " + INT4),
    m("int4_zero_is_min", 12, Q4, "the zero point is the minimum, not the middle code's value",
      ("(lo + 8 * scales.float())", "lo"),
      why="dequantisation is (q - 8) s + z, so z must be the value of code 8: z = min + 8 s; " + INT4),
    m("int4_no_offset", 12, Q4, "the codes are not shifted by 8",
      ("/ scales.float()[..., None]) + 8", "/ scales.float()[..., None])"),
      why="(W - z) / s lies in [-8, 7]; + 8 makes the codes 0 … 15 (they are stored unsigned)"),
    m("int4_dequant_no_offset", 12, D4, "dequantisation forgets to subtract 8", ("(groups - 8)", "groups"),
      why="the codes are stored as q + 8 in 0 … 15: W ≈ (q - 8) · s + z"),
]


def weight(g, n, k):
    w = randn(g, n, k)
    w[1] *= 20  # a loud row: a scale shared across rows would coarsen all the others
    return w


def cases():
    g = generator(12)

    def q8(code, t):
        return code.quantize_int8(t["w"])
    yield Case("quantize_int8", {"w": weight(g, 6, 16)}, q8, hint=INT8)

    def d8(code, t):
        return code.dequantize_int8(t["codes"], t["scales"])
    codes8 = randn(g, 6, 16).mul(40).round().clamp(-127, 127).to(torch.int8)
    yield Case("dequantize_int8", {"codes": codes8, "scales": randn(g, 6).abs().to(torch.bfloat16)}, d8, hint=INT8)

    def q4(code, t):
        return code.quantize_int4(t["w"], 8)
    yield Case("quantize_int4", {"w": weight(g, 4, 32)}, q4, params={"group_size": 8}, hint=INT4)

    def d4(code, t):
        return code.dequantize_int4(t["codes"], t["scales"], t["zeros"])
    yield Case("dequantize_int4", {"codes": torch.randint(0, 16, (4, 32), generator=g).to(torch.uint8),
                                   "scales": randn(g, 4, 4).abs().to(torch.bfloat16),
                                   "zeros": randn(g, 4, 4).to(torch.bfloat16)}, d4, params={"group_size": 8},
               hint=INT4)

