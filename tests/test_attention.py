"""Attention: the mask, the two formulations against a loop written from the definition, grouped-query
heads against multi-head attention with repeated kv weights, and causality of the whole model."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from llama_min import Llama
from llama_min.attention import attention_mask, plain_attention, sdpa_attention

from conftest import max_abs_diff, random_model, random_tokens, tiny_config

IMPLS = ["plain", "sdpa"]
# max |Δlogit| between two float32 formulations of the same model: with logits up to ~4, rounding
# alone gives ~2e-6, and any real difference gives more than 1e-2.
MODEL_TOL = 2e-5


def reference_mask(batch: int, start: int, seq_len: int, pad_lens: list[int] | None) -> torch.Tensor:
    """Slot by slot: query slot i (start <= i < start+T) sees key slot j when j <= i and j is not
    padding; a padding query sees only itself. (B, 1, T, S) bool."""
    S = start + seq_len
    mask = torch.zeros(batch, 1, seq_len, S, dtype=torch.bool)
    for b in range(batch):
        pad = 0 if pad_lens is None else pad_lens[b]
        for t in range(seq_len):
            i = start + t
            for j in range(S):
                mask[b, 0, t, j] = (j <= i and j >= pad) or j == i
    return mask


@pytest.mark.parametrize("start, seq_len, pad_lens", [
    (0, 6, None), (4, 1, None), (3, 4, None), (0, 6, [0, 2, 5]), (5, 3, [1, 0, 6]),
])
def test_attention_mask_matches_definition(start, seq_len, pad_lens):
    pads = None if pad_lens is None else torch.tensor(pad_lens)
    got = attention_mask(start, seq_len, pads)
    batch = 1 if pad_lens is None else len(pad_lens)
    expected = reference_mask(batch, start, seq_len, pad_lens)
    assert got.dtype == torch.bool, f"mask should be bool, got {got.dtype}"
    got = got.expand_as(expected)
    assert torch.equal(got, expected), (
        f"attention_mask(start={start}, seq_len={seq_len}, pad_lens={pad_lens}) is wrong at "
        f"(b, 0, t, j) = {(got != expected).nonzero()[:5].tolist()} (first five)")


def reference_attention(q, k, v, mask):
    """Head by head: query head h reads kv head h // (H / H_kv) (GQA paper, section 2.2).
    q: (B, H, T, d); k, v: (B, H_kv, S, d); mask: bool broadcastable to (B, 1, T, S). float64."""
    B, H, T, d = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    mask = mask.expand(B, 1, T, S)
    out = torch.empty(B, H, T, d, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kv = h // (H // H_kv)
            scores = q[b, h].double() @ k[b, kv].double().T / math.sqrt(d)  # (T, S)
            scores = scores.masked_fill(~mask[b, 0], float("-inf"))
            out[b, h] = torch.softmax(scores, dim=-1) @ v[b, kv].double()
    return out


def _qkv(B=2, H=4, H_kv=2, T=5, S=5, d=16):
    return torch.randn(B, H, T, d), torch.randn(B, H_kv, S, d), torch.randn(B, H_kv, S, d)


MASK_CASES = {
    "square causal, mask=None": (0, 5, None),
    "cache: 3 queries after 4 cached keys": (4, 3, None),
    "cache: 1 query after 8 cached keys": (8, 1, None),
    "left padding, square": (0, 5, [0, 3]),
    "left padding with cache": (4, 3, [2, 5]),
}


@pytest.mark.parametrize("attend", [plain_attention, sdpa_attention], ids=IMPLS)
@pytest.mark.parametrize("case", list(MASK_CASES))
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_attention_matches_reference(attend, case, heads):
    start, T, pad_lens = MASK_CASES[case]
    H, H_kv = heads
    q, k, v = _qkv(H=H, H_kv=H_kv, T=T, S=start + T)
    pads = None if pad_lens is None else torch.tensor(pad_lens)
    explicit = attention_mask(start, T, pads)
    mask = None if start == 0 and pad_lens is None else explicit
    got = attend(q, k, v, mask)
    expected = reference_attention(q, k, v, reference_mask(2, start, T, pad_lens))
    # Padding queries (slot < pad_len) are never read by the model; compare only real query rows.
    real = torch.ones(2, 1, T, 1, dtype=torch.bool)
    if pad_lens is not None:
        real = (torch.arange(start, start + T)[None, :] >= pads[:, None])[:, None, :, None]
    diff = ((got.double() - expected).abs() * real).max().item()
    assert diff < 1e-5, f"{attend.__name__}, {case}, {H} heads / {H_kv} kv heads: max |diff| vs reference = {diff:.3g}"


@pytest.mark.parametrize("case", list(MASK_CASES))
def test_plain_equals_sdpa_functions(case):
    start, T, pad_lens = MASK_CASES[case]
    q, k, v = _qkv(T=T, S=start + T)
    mask = None if start == 0 and pad_lens is None else attention_mask(start, T, None if pad_lens is None else torch.tensor(pad_lens))
    a, b = plain_attention(q, k, v, mask), sdpa_attention(q, k, v, mask)
    assert max_abs_diff(a, b) < 1e-5, f"{case}: plain vs sdpa max |diff| = {max_abs_diff(a, b):.3g}"


def _pair(config):
    """The same random weights in a plain-attention model and an SDPA model."""
    plain = random_model(replace(config, attn_impl="plain"))
    sdpa = Llama(replace(config, attn_impl="sdpa")).eval()
    sdpa.load_state_dict(plain.state_dict())
    return plain, sdpa


def test_plain_equals_sdpa_model_full_forward():
    plain, sdpa = _pair(tiny_config())
    tokens = random_tokens(plain.config, 3, 20)
    with torch.no_grad():
        a, _ = plain(tokens)
        b, _ = sdpa(tokens)
    assert max_abs_diff(a, b) < MODEL_TOL, f"logits, plain vs sdpa, full forward: max |diff| = {max_abs_diff(a, b):.3g}"


def test_plain_equals_sdpa_model_with_cache_and_padding():
    """Explicit masks: a left-padded prefill into the cache, then one-token and chunked steps."""
    plain, sdpa = _pair(tiny_config())
    tokens = random_tokens(plain.config, 3, 16)
    pad_lens = torch.tensor([0, 3, 6])
    outs = []
    for model in (plain, sdpa):
        model.setup_cache(batch_size=3, max_seq_len=16)
        with torch.no_grad():
            steps = [model(tokens[:, :8], start_pos=0, pad_lens=pad_lens)[0],
                     model(tokens[:, 8:9], start_pos=8, pad_lens=pad_lens)[0],
                     model(tokens[:, 9:16], start_pos=9, pad_lens=pad_lens)[0]]
        model.drop_cache()
        logits = torch.cat(steps, dim=1)
        outs.append(torch.cat([logits[b, p:] for b, p in enumerate(pad_lens.tolist())]))  # real positions only
    assert max_abs_diff(*outs) < MODEL_TOL, f"logits, plain vs sdpa, cache + padding: max |diff| = {max_abs_diff(*outs):.3g}"


@pytest.mark.parametrize("attn_impl", IMPLS)
def test_gqa_equals_mha_with_repeated_kv_weights(attn_impl):
    """GQA with H_kv kv heads is MHA whose kv head h is a copy of GQA's kv head h // (H / H_kv)."""
    gqa_config = tiny_config(n_heads=8, n_kv_heads=2, attn_impl=attn_impl)
    gqa = random_model(gqa_config)
    mha = Llama(replace(gqa_config, n_kv_heads=8)).eval()
    groups, d = 4, gqa_config.head_dim
    state = {}
    for name, w in gqa.state_dict().items():
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            heads = w.view(gqa_config.n_kv_heads, d, gqa_config.dim)  # rows grouped by kv head
            w = torch.stack([heads[h // groups] for h in range(gqa_config.n_heads)]).reshape(-1, gqa_config.dim)
        state[name] = w
    mha.load_state_dict(state, strict=True)
    tokens = random_tokens(gqa_config, 2, 12)
    with torch.no_grad():
        a, _ = gqa(tokens)
        b, _ = mha(tokens)
    assert max_abs_diff(a, b) < MODEL_TOL, f"GQA vs MHA with repeated kv weights ({attn_impl}): max |diff| = {max_abs_diff(a, b):.3g}"


@pytest.mark.parametrize("attn_impl", IMPLS)
def test_changing_a_token_never_changes_earlier_logits(attn_impl):
    config = tiny_config(attn_impl=attn_impl)
    model = random_model(config)
    tokens = random_tokens(config, 2, 10)
    with torch.no_grad():
        base, _ = model(tokens)
        for t in range(tokens.shape[1]):
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 1 + t) % config.vocab_size
            logits, _ = model(changed)
            before = max_abs_diff(logits[:, :t], base[:, :t]) if t else 0.0
            assert before < 1e-6, f"{attn_impl}: changing token {t} changed logits at earlier positions by {before:.3g}"
            after = max_abs_diff(logits[:, t:], base[:, t:])
            assert after > 1e-3, f"{attn_impl}: changing token {t} did not change logits at positions >= {t}"


def test_kv_heads_are_repeated_where_cuda_would_lose_its_fast_kernel(monkeypatch):
    """On CUDA only the flash kernel takes grouped kv heads (enable_gqa), and not with a mask or float32
    inputs; there attention repeats the kv heads itself. The device check is forced here (no GPU in CI),
    and the kernel's inputs are watched: the result must not change."""
    import llama_min.attention as attention

    q, k, v = (torch.randn(2, h, n, 8) for h, n in ((4, 5), (2, 8), (2, 8)))  # 5 queries after 3 cached
    mask = attention.attention_mask(3, 5, torch.tensor([0, 2]))  # (2, 1, 5, 8), with left padding
    seen = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((k.shape[1], kwargs.get("enable_gqa")))
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    expected = plain_attention(q, k, v, mask)
    monkeypatch.setattr(attention, "kernel_broadcasts_kv_heads", lambda q, mask: False)  # as CUDA with a mask
    assert max_abs_diff(sdpa_attention(q, k, v, mask), expected) < 1e-5
    monkeypatch.setattr(attention, "kernel_broadcasts_kv_heads", lambda q, mask: True)  # as the CPU or flash
    assert max_abs_diff(sdpa_attention(q, k, v, mask), expected) < 1e-5
    assert seen == [(4, False), (2, True)], f"kv heads given to the kernel (heads, enable_gqa): {seen}"


@pytest.mark.parametrize("device, dtype, masked, broadcast", [
    ("cpu", torch.float32, True, True),
    ("cuda", torch.bfloat16, False, True),  # flash: takes grouped kv heads
    ("cuda", torch.bfloat16, True, False),  # a mask: memory-efficient kernel, kv heads repeated
    ("cuda", torch.float32, False, False),  # float32: no flash
])
def test_when_the_kernel_takes_grouped_kv_heads(device, dtype, masked, broadcast):
    from types import SimpleNamespace

    from llama_min.attention import kernel_broadcasts_kv_heads
    q = SimpleNamespace(device=torch.device(device), dtype=dtype)  # only where the tensor lives and its dtype
    assert kernel_broadcasts_kv_heads(q, torch.ones(1, dtype=torch.bool) if masked else None) is broadcast
