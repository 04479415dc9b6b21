"""Lab 4, causal attention: ``causal_mask``, ``attention_mask``, ``plain_attention``, ``sdpa_attention`` and
``Attention.forward`` against the reference outputs stored in lab/fixtures/lab04.*.

``Attention.forward`` calls other labs' functions; here they are stand-ins (graders/standins.py) that replay
the reference's outputs for this case's inputs, so that only this lab's code is graded.
"""

import pytest
import torch

import llama_min.attention as attention_module
from lab.graders.check import LabFixtures, check, fail
from lab.graders.standins import GrowingCache, ReplayAdapter, ReplayCache, position_stamp, replay_rotary
from llama_min.attention import Attention, attention_mask, causal_mask, plain_attention, sdpa_attention
from llama_min.config import ModelConfig

LAB = LabFixtures(4)


@pytest.mark.parametrize("shape", ["5x5", "3x7", "1x6"])
def test_causal_mask(shape):
    """The causal triangle for T queries that are the last T of S positions."""
    case = LAB.case(f"causal_mask.{shape}")
    T, S = case.params["T"], case.params["S"]
    check(causal_mask(T, S), case, f"causal_mask(T={T}, S={S})")


@pytest.mark.parametrize("name", ["start0_T5", "start0_T6_pad023", "start6_T1_pad023", "start4_T2_pad10"])
def test_attention_mask(name):
    """Causality plus left padding, for queries at cache slots start … start + seq_len − 1."""
    case = LAB.case(f"attention_mask.{name}")
    pad_lens = case["pad_lens"] if "pad_lens" in case.tensors else None
    start, T = case.params["start"], case.params["seq_len"]
    pads = None if pad_lens is None else pad_lens.tolist()
    check(attention_mask(start, T, pad_lens), case, f"attention_mask(start={start}, seq_len={T}, pad_lens={pads})")


def attention_inputs(case):
    mask = case["mask"] if "mask" in case.tensors else None
    q, k = case["q"], case["k"]
    what = f"q {tuple(q.shape)}, k/v {tuple(k.shape)}, mask {'None' if mask is None else tuple(mask.shape)}"
    return q, k, case["v"], mask, what


@pytest.mark.parametrize("name", ["square", "cached", "padded", "bfloat16"])
def test_plain_attention(name):
    """4 query heads sharing 2 kv heads: T = S causal, 3 queries after 4 cached keys, a padding mask, and
    bfloat16 inputs with 48 keys (the softmax must run in float32)."""
    case = LAB.case(f"plain.{name}")
    q, k, v, mask, what = attention_inputs(case)
    check(plain_attention(q, k, v, mask), case, f"plain_attention({what})")


@pytest.mark.parametrize("name", ["square", "cached", "padded"])
def test_sdpa_attention(name):
    """The same cases through PyTorch's fused kernel."""
    case = LAB.case(f"sdpa.{name}")
    q, k, v, mask, what = attention_inputs(case)
    check(sdpa_attention(q, k, v, mask), case, f"sdpa_attention({what})")


def attention_module_for(case) -> Attention:
    config = ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=16, multiple_of=16, max_seq_len=16,
                         attn_impl="plain")
    attn = Attention(config)
    with torch.no_grad():
        for name in ("wq", "wk", "wv", "wo"):
            getattr(attn, name).weight.copy_(case[name])
    return attn


def forward(case, monkeypatch, start: int = 0):
    attn = attention_module_for(case)
    cos, sin = case["cos"], case["sin"]
    monkeypatch.setattr(attention_module, "apply_rotary", replay_rotary(case, cos, sin))
    return attn, lambda: attn(case["x"], cos, sin, None, start)


def test_forward(monkeypatch):
    """dim 32, 4 query heads, 2 kv heads, x (2, 5, 32), no cache."""
    case = LAB.case("forward.plain")
    attn, run = forward(case, monkeypatch)
    with torch.no_grad():
        check(run(), case, "Attention.forward(x (2, 5, 32), cos, sin, mask=None)")


def test_forward_with_cache(monkeypatch):
    """Two new tokens after 3 cached positions: the new keys go through self.cache.update."""
    case = LAB.case("forward.cached")
    start = case.params["start"]
    attn, run = forward(case, monkeypatch, start)
    attn.cache = ReplayCache(case)
    with torch.no_grad():
        y = run()
    check(y, case, f"Attention.forward(x (2, 2, 32), cos, sin, mask=None, start={start}) with an active cache")


def test_forward_with_prompt_adapter(monkeypatch):
    """A prompt adapter installed: its output is added to the heads' output before wo."""
    case = LAB.case("forward.adapter")
    attn, run = forward(case, monkeypatch)
    attn.prompt_adapter = ReplayAdapter(case, attn.wk, attn.wv)
    with torch.no_grad():
        check(run(), case, "Attention.forward(x (2, 5, 32), cos, sin, mask=None) with a prompt adapter")


def test_cached_steps_equal_the_full_forward(monkeypatch):
    """A prefill of 3 tokens, then 3 single-token steps through a cache, give the full forward's outputs (with
    stand-ins for the rotation and the cache, so that only this lab's code runs)."""
    attn = attention_module_for(LAB.case("forward.plain"))
    monkeypatch.setattr(attention_module, "apply_rotary", position_stamp)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 32, generator=g)
    angles = torch.arange(6).float()[:, None] * torch.tensor([1.0, 0.3, 0.1, 0.03])  # (T, d/2)
    cos, sin = angles.cos(), angles.sin()
    with torch.no_grad():
        full = attn(x, cos, sin, None, 0)
        attn.cache = GrowingCache()
        steps = [attn(x[:, s:e], cos[s:e], sin[s:e], None, s) for s, e in ((0, 3), (3, 4), (4, 5), (5, 6))]
    if not all(torch.is_tensor(y) and y.shape == (2, e - s, 32) for y, (s, e) in
               zip(steps, ((0, 3), (3, 4), (4, 5), (5, 6)))):
        fail("with a cache, Attention.forward of T new tokens must return (B, T, dim) for those tokens only; got "
             + ", ".join(str(tuple(getattr(y, "shape", ()))) for y in steps))
    cached = torch.cat(steps, 1)
    wrong = [t for t in range(6) if not torch.allclose(cached[:, t], full[:, t], atol=1e-5, rtol=1e-4)]
    if wrong:
        fail(f"a prefill of 3 tokens then one token at a time through the cache gives other outputs than the full "
             f"forward at positions {wrong}. Each step must do what the full forward does for its tokens: rotate "
             "the new q and k with their own cos/sin (the cache never holds keys before the rotation), attend "
             "over the cached keys and the new ones")
