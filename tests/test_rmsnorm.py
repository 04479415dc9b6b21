"""RMSNorm against the formula of Zhang & Sennrich (2019, eq. 4), written here a second way."""

import pytest
import torch

from llama_min.rmsnorm import RMSNorm

from conftest import max_abs_diff


def reference_rmsnorm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """y_i = x_i / sqrt(mean_j(x_j²) + eps) · g_i, computed in float64 through the vector norm:
    mean(x²) = ||x||² / n."""
    x64 = x.double()
    rms = torch.sqrt(torch.linalg.vector_norm(x64, dim=-1, keepdim=True) ** 2 / x.shape[-1] + eps)
    return x64 / rms * gain.double()


@pytest.mark.parametrize("eps", [1e-6, 1e-5, 0.5])
def test_rmsnorm_matches_formula_float32(eps):
    norm = RMSNorm(48, eps=eps)
    with torch.no_grad():
        norm.weight.uniform_(-2.0, 2.0)
    x = torch.randn(3, 5, 48) * 3.0
    y = norm(x)
    expected = reference_rmsnorm(x, norm.weight, eps)
    assert y.dtype == torch.float32 and y.shape == x.shape, f"got {y.dtype} {tuple(y.shape)}"
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"RMSNorm(eps={eps}) differs from the formula: {m}")


def test_rmsnorm_uses_its_eps():
    """With a tiny input the eps term dominates, so a hard-coded eps shows immediately."""
    x = torch.full((1, 8), 1e-3)
    y_small, y_large = RMSNorm(8, eps=1e-6)(x), RMSNorm(8, eps=1e-2)(x)
    for eps, y in ((1e-6, y_small), (1e-2, y_large)):
        expected = reference_rmsnorm(x, torch.ones(8), eps)
        assert max_abs_diff(y, expected) < 1e-6, \
            f"eps={eps}: output {y[0, 0].item():.6g}, formula gives {expected[0, 0].item():.6g}"


def test_bfloat16_input_is_normalised_in_float32_then_cast_back():
    """Meta's order: normalise in float32, cast to the input dtype, then multiply by the (bf16) gain.

    The reference normalises in float64 and rounds once to bfloat16. Any float32 implementation of that
    order agrees with it except where a value sits within float32 rounding of a bfloat16 rounding
    boundary (a handful of elements at most); doing the arithmetic in bfloat16, or applying the gain
    before the cast, changes about a quarter of the elements."""
    norm = RMSNorm(4096, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    norm = norm.to(torch.bfloat16)
    # Large, varied magnitudes: summing 4096 squares in bfloat16 would lose most of the precision.
    x = (torch.randn(4, 4096) * torch.logspace(-1, 2, 4096)).to(torch.bfloat16)

    def mismatched(y: torch.Tensor) -> float:
        x64 = x.double()
        expected = (x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16) * norm.weight
        return (y != expected).double().mean().item()

    y = norm(x)
    assert y.dtype == torch.bfloat16, f"bfloat16 input should give bfloat16 output, got {y.dtype}"
    assert mismatched(y) <= 1e-3, (f"bfloat16 RMSNorm is not the float32 computation cast back: "
                                   f"{mismatched(y):.1%} of the elements differ from it")
    # The check above can tell the orders apart: bfloat16 arithmetic differs in many elements.
    naive = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert mismatched(naive) > 0.05, "test input too easy: bfloat16 arithmetic gives nearly the same result"
