"""Lab 12, weight-only quantisation: ``quantize_int8``, ``dequantize_int8``, ``quantize_int4`` and
``dequantize_int4`` against the reference outputs stored in lab/fixtures/lab12.*."""

import torch

from lab.graders.check import LabFixtures, check
from llama_min.quantize import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8

LAB = LabFixtures(12)


def test_quantize_int8():
    """A (6, 16) weight with one loud row -> int8 codes (6, 16) and bfloat16 scales (6,)."""
    case = LAB.case("quantize_int8")
    check(quantize_int8(case["w"]), case, "quantize_int8 of a (6, 16) weight")


def test_dequantize_int8():
    """int8 codes (6, 16) and scales (6,) -> float32 (6, 16)."""
    case = LAB.case("dequantize_int8")
    check(dequantize_int8(case["codes"], case["scales"]), case, "dequantize_int8 of (6, 16) codes")


def test_quantize_int4():
    """A (4, 32) weight in groups of 8 -> codes uint8 (4, 32) in 0 … 15, scales and zeros bfloat16 (4, 4)."""
    case = LAB.case("quantize_int4")
    check(quantize_int4(case["w"], case.params["group_size"]), case, "quantize_int4 of a (4, 32) weight, groups of 8")


def test_dequantize_int4():
    """codes (4, 32), scales and zeros (4, 4) -> float32 (4, 32)."""
    case = LAB.case("dequantize_int4")
    check(dequantize_int4(case["codes"], case["scales"], case["zeros"]), case, "dequantize_int4 of (4, 32) codes")


def test_round_trip_is_within_half_a_step():
    """Your quantize then dequantize: every weight within half a step of its row (int8) or group (int4)."""
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    codes, scales = quantize_int8(w)
    error = (dequantize_int8(codes, scales) - w).abs()
    assert (error <= scales.float()[:, None] / 2 + 1e-6).all(), \
        "int8: a weight is more than half a step from its dequantised value: round to the nearest code"
    codes, scales, zeros = quantize_int4(w, 16)
    error = (dequantize_int4(codes, scales, zeros) - w).abs().reshape(8, 4, 16)
    step = scales.float()[..., None]
    assert (error <= step / 2 + zeros.float().abs()[..., None] * 2**-8 + 1e-6).all(), \
        "int4: a weight is more than half a step from its dequantised value: check the zero point and the + 8"
