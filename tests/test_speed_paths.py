"""Fast paths agree with the plain formulations they stand in for.

The plain code is what a reader follows and what the other tests check against independent references;
each fast path here is compared with it, values and gradients, so the two cannot drift apart.
"""

import pytest
import torch

from llama_min import Llama, ModelConfig
from llama_min.rope import RotaryEmbedding, apply_rotary, apply_rotary_complex


@pytest.mark.parametrize("batched_positions", [False, True])
def test_complex_rotary_matches_real_rotary_values_and_gradients(batched_positions):
    torch.manual_seed(0)
    B, T, H, d = 2, 7, 3, 16
    rope = RotaryEmbedding(d, 32, 10000.0)
    # (T,) positions as in training; (B, T) as with left-padded prompts, where rows differ
    positions = torch.stack([torch.arange(3, 3 + T), torch.arange(T)]) if batched_positions else torch.arange(5, 5 + T)
    cos, sin = rope(positions)
    x = torch.randn(B, T, H, d)
    x_plain, x_fast = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    plain, fast = apply_rotary(x_plain, cos, sin), apply_rotary_complex(x_fast, cos, sin)
    torch.testing.assert_close(fast, plain, rtol=1e-6, atol=1e-6, msg="complex rotation differs from the real one")
    upstream = torch.randn_like(plain)
    plain.backward(upstream)
    fast.backward(upstream)
    torch.testing.assert_close(x_fast.grad, x_plain.grad, rtol=1e-6, atol=1e-6,
                               msg="gradient through the complex rotation differs from the real one")


def test_complex_rotary_keeps_bfloat16_and_rotates_in_float32():
    torch.manual_seed(0)
    rope = RotaryEmbedding(8, 16, 10000.0)
    cos, sin = rope(torch.arange(10))
    x = torch.randn(1, 10, 2, 8).bfloat16()
    fast, plain = apply_rotary_complex(x, cos, sin), apply_rotary(x, cos, sin)
    assert fast.dtype == torch.bfloat16, f"the fast path returned {fast.dtype} for bfloat16 input"
    torch.testing.assert_close(fast, plain, rtol=0, atol=0,
                               msg="both paths rotate in float32 and round once, so bfloat16 results must be equal")


def test_model_with_fast_paths_matches_plain_model():
    """attn_impl="sdpa" (fused attention, complex rotation) against attn_impl="plain" (both written
    out): same weights, same logits and same gradients, with grouped-query heads."""
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=32)
    torch.manual_seed(0)
    fast = Llama(config)
    plain = Llama(ModelConfig.from_dict({**config.to_dict(), "attn_impl": "plain"}))
    plain.load_state_dict(fast.state_dict())
    tokens = torch.randint(0, 97, (3, 20))
    targets = torch.randint(0, 97, (3, 20))
    logits_fast, loss_fast = fast(tokens, targets)
    logits_plain, loss_plain = plain(tokens, targets)
    torch.testing.assert_close(logits_fast, logits_plain, rtol=1e-5, atol=1e-5, msg="fast and plain logits differ")
    loss_fast.backward()
    loss_plain.backward()
    for (name, p_fast), p_plain in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p_fast.grad, p_plain.grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"gradient of {name} differs: {m}")
