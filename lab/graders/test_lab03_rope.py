"""Lab 3, rotary position embeddings: ``RotaryEmbedding.inv_freq``, ``RotaryEmbedding.forward`` and
``apply_rotary`` against the reference outputs stored in lab/fixtures/lab03.*, and the property RoPE exists
for: a rotated query and key meet in a dot product that depends on their positions only through the offset."""

import pytest
import torch

from lab.graders.check import LabFixtures, check, fail
from llama_min.config import RopeScaling
from llama_min.rope import RotaryEmbedding, apply_rotary

LAB = LabFixtures(3)


@pytest.mark.parametrize("name", ["d16", "d10", "d32_scaled"])
def test_inv_freq(name):
    """θ_i = theta^(−2i/d) for i = 0 … d/2 − 1; with Llama 3.1's RoPE scaling, scaled_frequencies of them."""
    case = LAB.case(f"inv_freq.{name}")
    p = case.params
    scaling = RopeScaling(**p["scaling"]) if "scaling" in p else None
    rope = RotaryEmbedding(p["head_dim"], p["theta"], scaling)
    what = f"RotaryEmbedding({p['head_dim']}, theta={p['theta']:g}" + (f", scaling={scaling}" if scaling else "") + \
        ").inv_freq"
    check(rope.inv_freq(torch.device("cpu")), case, what)


@pytest.mark.parametrize("name", ["positions", "batched"])
def test_cos_sin(name):
    """cos and sin of m·θ_i for positions (T,) and (B, T)."""
    case = LAB.case(f"forward.{name}")
    rope = RotaryEmbedding(case.params["head_dim"], case.params["theta"])
    positions = case["positions"]
    check(rope(positions), case, f"RotaryEmbedding(16, 10000)(positions {tuple(positions.shape)}) -> (cos, sin)")


@pytest.mark.parametrize("name", ["float32", "batched", "bfloat16"])
def test_apply_rotary(name):
    """Rotating x (B, T, H, d) by given angles: cos/sin (T, d/2), per-row (B, T, d/2), and bfloat16 x."""
    case = LAB.case(f"apply_rotary.{name}")
    x, cos, sin = case["x"], case["cos"], case["sin"]
    check(apply_rotary(x, cos, sin), case, f"apply_rotary(x {tuple(x.shape)} {x.dtype}, cos/sin {tuple(cos.shape)})")


def test_dot_product_depends_only_on_the_offset():
    """q rotated to position m and k rotated to position n: q_m · k_n is the same for every m with the same
    m − n (RoFormer section 3.2.2, eq. 16), and the rotation keeps each vector's length."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(16, generator=g), torch.randn(16, generator=g)
    n = 40
    cos, sin = RotaryEmbedding(16, 10000.0)(torch.arange(n))
    qs = apply_rotary(q.expand(1, n, 1, 16), cos, sin)[0, :, 0]  # (n, 16): q at every position
    ks = apply_rotary(k.expand(1, n, 1, 16), cos, sin)[0, :, 0]
    lengths = qs.norm(dim=-1)
    if not torch.allclose(lengths, q.norm().expand(n), rtol=1e-4):
        fail(f"rotating q changed its length: {q.norm():.4f} at first, {lengths[:4].tolist()} at positions 0-3; "
             "a rotation of each pair keeps the norm (cos² + sin² = 1)")
    dots = qs @ ks.T  # dots[m, j] = q_m · k_j
    for offset in (0, 1, 5, 17):
        same_offset = dots.diagonal(-offset)  # m − j = offset
        if not torch.allclose(same_offset, same_offset[0].expand_as(same_offset), atol=1e-4, rtol=1e-4):
            fail(f"q_m · k_n changes with m for the fixed offset m − n = {offset}: "
                 f"{[round(v, 4) for v in same_offset[:5].tolist()]} for m = {offset} … {offset + 4}. With q and k "
                 "rotated by the angles of their own positions, only the offset should remain")
    if torch.allclose(dots.diagonal(0)[0], dots.diagonal(-5)[0], atol=1e-4):
        fail("q_m · k_n is the same at offsets 0 and 5: the rotation does not depend on the position")
