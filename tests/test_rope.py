"""Rotary embeddings against Meta's complex-number formulation, and the relative-position property.

The reference is written here from RoFormer's definition (Su et al. 2021, section 3.4.2): view each
adjacent feature pair (2i, 2i+1) as the complex number x_2i + i·x_2i+1 and multiply it by
exp(i·m·θ_i), θ_i = theta^(-2i/d). Nothing of llama_min.rope is used to build the expected values.
"""

import pytest
import torch

from llama_min.rope import RotaryEmbedding, apply_rotary

from conftest import max_abs_diff, random_model, tiny_config


def complex_rope_reference(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x: (B, T, H, d); positions: (T,) or (B, T). Rotation as a complex product, float32."""
    d = x.shape[-1]
    freqs = 1.0 / (theta ** (torch.arange(0, d, 2)[: d // 2].float() / d))  # θ_i, (d/2,)
    angles = positions.float()[..., None] * freqs  # (T, d/2) or (B, T, d/2)
    rotors = torch.polar(torch.ones_like(angles), angles)  # exp(i·m·θ_i)
    rotors = rotors.unsqueeze(-2)  # broadcast over heads
    x_complex = torch.view_as_complex(x.float().reshape(*x.shape[:-1], d // 2, 2))
    return torch.view_as_real(x_complex * rotors).flatten(-2)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_matches_complex_reference(theta):
    head_dim = 32
    rope = RotaryEmbedding(head_dim, theta)
    x = torch.randn(2, 7, 3, head_dim)
    positions = torch.tensor([0, 1, 2, 17, 63, 100, 127])  # not contiguous, up to the last slot
    got = apply_rotary(x, *rope(positions))
    expected = complex_rope_reference(x, positions, theta)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"RoPE (theta={theta}) differs from the complex reference: {m}")


def test_rope_per_row_positions_match_reference():
    """(B, T) positions, as left-padded batches use: each row rotated at its own positions."""
    rope = RotaryEmbedding(16, 10000.0)
    x = torch.randn(2, 5, 4, 16)
    positions = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]])
    got = apply_rotary(x, *rope(positions))
    expected = complex_rope_reference(x, positions, 10000.0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"RoPE with (B, T) positions differs from the reference: {m}")


def test_rope_keeps_dtype_and_norm():
    """A rotation preserves the length of every pair; bfloat16 in gives bfloat16 out."""
    rope = RotaryEmbedding(16, 10000.0)
    x = torch.randn(1, 10, 2, 16)
    y = apply_rotary(x, *rope(torch.arange(10)))
    pair_norms = lambda t: t.unflatten(-1, (-1, 2)).norm(dim=-1)
    assert max_abs_diff(pair_norms(y), pair_norms(x)) < 1e-5, "RoPE changed the length of a feature pair"
    y16 = apply_rotary(x.bfloat16(), *rope(torch.arange(10)))
    assert y16.dtype == torch.bfloat16, f"bfloat16 input gave {y16.dtype}"


def test_rotated_dot_product_depends_only_on_offset():
    """RoFormer eq. 16: <R_m q, R_n k> = <q, R_(n-m) k>, so it is unchanged when m and n shift together."""
    head_dim = 32
    rope = RotaryEmbedding(head_dim, 10000.0)
    q, k = torch.randn(1, 1, 1, head_dim), torch.randn(1, 1, 1, head_dim)

    def score(m: int, n: int) -> float:
        qm = apply_rotary(q, *rope(torch.tensor([m])))
        kn = apply_rotary(k, *rope(torch.tensor([n])))
        return (qm * kn).sum().item()

    for offset in (0, 1, 5, 40):
        base = score(10, 10 + offset)
        for shift in (0, 3, 77, 200):
            s = score(10 + shift, 10 + offset + shift)
            assert abs(s - base) < 1e-4 * max(1.0, abs(base)), (
                f"q·k at positions ({10 + shift}, {10 + offset + shift}) is {s:.6f} but at "
                f"(10, {10 + offset}) it is {base:.6f}: it should depend only on the offset {offset}")
    # ...and it does depend on the offset, so the property above is not satisfied by doing nothing.
    assert abs(score(10, 11) - score(10, 50)) > 1e-3, "q·k is the same at offsets 1 and 40: no rotation applied?"


def test_rotary_angles_stay_float32_when_the_weights_are_cast():
    """rope.py promises float32 angles whatever the weights' dtype; a bfloat16 cos would be off by ~2e-3."""
    config = tiny_config()
    model = random_model(config).to(torch.bfloat16)
    positions = torch.arange(config.max_seq_len)
    cos, sin = model.rope(positions)
    assert cos.dtype == sin.dtype == torch.float32, f"model.to(bfloat16) made the rotary angles {cos.dtype}"
    angles = positions.double()[:, None] * 10000.0 ** (-torch.arange(0, config.head_dim, 2).double() / config.head_dim)
    assert max_abs_diff(cos, angles.cos()) < 1e-6 and max_abs_diff(sin, angles.sin()) < 1e-6, \
        "the rotary angles of a bfloat16 model must be the float32 values"


def test_rotary_tables_are_not_in_the_state_dict():
    model = random_model(tiny_config())
    rope_keys = [k for k in model.state_dict() if "cos" in k or "sin" in k or "rope" in k]
    assert not rope_keys, f"rotary tables are derived from the config and must not be saved: {rope_keys}"


def test_model_rope_uses_config_theta():
    config = tiny_config(rope_theta=123456.0)
    model = random_model(config)
    positions = torch.arange(config.max_seq_len)
    x = torch.randn(1, config.max_seq_len, 1, config.head_dim)
    got = apply_rotary(x, *model.rope(positions))
    expected = complex_rope_reference(x, positions, 123456.0)
    assert max_abs_diff(got, expected) < 1e-4, "the model's rotary tables do not follow config.rope_theta"
