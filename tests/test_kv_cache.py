"""The KV cache: incremental decoding must give the logits of the full forward pass, for a GQA config
and a batch, one token at a time and in chunks; left-padded batches must give every row the logits it
gets alone (what batched generation relies on)."""

import pytest
import torch

from llama_min.kv_cache import KVCache

from conftest import max_abs_diff, random_model, random_tokens, tiny_config

IMPLS = ["plain", "sdpa"]
TOL = 5e-5  # max |Δlogit|, float32, logits up to ~4: rounding gives ~2e-6, a real mistake > 1e-2


def decode_in_steps(model, tokens: torch.Tensor, sizes: list[int], pad_lens=None) -> torch.Tensor:
    """Feed tokens through a fresh cache in consecutive chunks of the given sizes; (B, T, vocab)."""
    model.setup_cache(batch_size=tokens.shape[0])
    out, start = [], 0
    with torch.no_grad():
        for size in sizes:
            logits, _ = model(tokens[:, start:start + size], start_pos=start, pad_lens=pad_lens)
            out.append(logits)
            start += size
    model.drop_cache()
    assert start == tokens.shape[1], "test bug: chunk sizes do not cover the sequence"
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("attn_impl", IMPLS)
@pytest.mark.parametrize("schedule", ["prefill then one token at a time", "prefill then chunks"])
def test_cached_decoding_equals_full_forward(attn_impl, schedule):
    config = tiny_config(attn_impl=attn_impl)  # 4 query heads share 2 kv heads
    model = random_model(config)
    tokens = random_tokens(config, 3, 20)
    sizes = {"prefill then one token at a time": [7] + [1] * 13,
             "prefill then chunks": [5, 4, 1, 7, 3]}[schedule]
    with torch.no_grad():
        full, _ = model(tokens)
    cached = decode_in_steps(model, tokens, sizes)
    diff = max_abs_diff(cached, full)
    assert diff < TOL, f"{attn_impl}, {schedule} {sizes}: cached logits differ from the full pass by {diff:.3g}"


def test_cache_holds_kv_heads_unrepeated():
    config = tiny_config(n_heads=8, n_kv_heads=2)
    model = random_model(config)
    model.setup_cache(batch_size=3, max_seq_len=40)
    k = model.layers[0].attention.cache.k
    expected = (3, config.n_kv_heads, 40, config.head_dim)
    assert tuple(k.shape) == expected, f"cache shape {tuple(k.shape)}, expected (B, n_kv_heads, max_seq_len, head_dim) = {expected}"
    assert k.dtype == model.tok_embeddings.weight.dtype, f"cache dtype {k.dtype} differs from the weights'"
    assert not any(name.endswith((".k", ".v")) for name in model.state_dict()), "the cache must not be saved with the weights"
    model.drop_cache()
    assert not model.layers[0].attention.cache.active, "drop_cache left a cache behind"


def test_cache_update_writes_at_positions_and_returns_the_prefix():
    cache = KVCache()
    cache.allocate(batch_size=2, n_kv_heads=3, max_seq_len=10, head_dim=4, dtype=torch.float32)
    k1, v1 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    k2, v2 = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    cache.update(0, k1, v1)
    k, v = cache.update(4, k2, v2)
    assert k.shape == (2, 3, 6, 4), f"after writing slots 0..5 the cache view should hold 6 slots, got {tuple(k.shape)}"
    assert torch.equal(k, torch.cat([k1, k2], dim=2)) and torch.equal(v, torch.cat([v1, v2], dim=2)), \
        "the cache does not return exactly what was written at slots 0..5"


def test_cache_overflow_is_a_clear_error():
    cache = KVCache()
    cache.allocate(1, 1, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="overflow"):
        cache.update(3, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))


def test_start_pos_without_cache_and_oversized_cache_are_refused():
    model = random_model(tiny_config())
    with pytest.raises(ValueError, match="setup_cache"):
        model(random_tokens(model.config, 1, 2), start_pos=3)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.setup_cache(1, max_seq_len=model.config.max_seq_len + 1)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(random_tokens(model.config, 1, model.config.max_seq_len + 1))


@pytest.mark.parametrize("attn_impl", IMPLS)
def test_left_padded_batch_equals_each_row_alone(attn_impl):
    """Prompts of lengths 9, 6 and 3, left-padded to 9 (with a token id that is not the pad, to show it
    is never read), then 5 generated tokens decoded one at a time with the cache. Every row's logits
    at its real positions must equal those of that row run alone, without padding and without cache."""
    config = tiny_config(attn_impl=attn_impl)
    model = random_model(config)
    prompt_lens, new = [9, 6, 3], 5
    width = max(prompt_lens)
    rows = [random_tokens(config, 1, n + new, seed=10 + i)[0] for i, n in enumerate(prompt_lens)]
    pad_lens = torch.tensor([width - n for n in prompt_lens])
    batch = torch.full((3, width + new), 7)
    for b, row in enumerate(rows):
        batch[b, pad_lens[b]:] = row

    batched = decode_in_steps(model, batch, [width] + [1] * new, pad_lens=pad_lens)
    with torch.no_grad():
        full_padded, _ = model(batch, pad_lens=pad_lens)  # the same batch without the cache
        for b, row in enumerate(rows):
            alone, _ = model(row[None])
            for name, got in (("cached", batched), ("uncached", full_padded)):
                diff = max_abs_diff(got[b, pad_lens[b]:], alone[0])
                assert diff < TOL, (f"{attn_impl}, {name}: row {b} (left padding {pad_lens[b].item()}) differs "
                                    f"from the same row alone by {diff:.3g}")


@pytest.mark.parametrize("attn_impl", IMPLS)
def test_fewer_queries_than_keys_without_a_mask_are_aligned_bottom_right(attn_impl):
    """Attention called directly with a filled cache and no mask (a chunk after the prefill) must treat
    the chunk as the last positions, as the full forward pass does, whatever the kernel's own alignment."""
    config = tiny_config(attn_impl=attn_impl)
    model = random_model(config)
    attention = model.layers[0].attention
    x = torch.randn(2, 7, config.dim)
    cos, sin = model.rope(torch.arange(7))
    with torch.no_grad():
        full = attention(x, cos, sin, mask=None)
        attention.cache.allocate(2, config.n_kv_heads, 7, config.head_dim, torch.float32)
        first = attention(x[:, :4], cos[:4], sin[:4], mask=None, start=0)
        rest = attention(x[:, 4:], cos[4:], sin[4:], mask=None, start=4)  # 3 queries, 7 keys
    attention.cache.release()
    assert max_abs_diff(torch.cat([first, rest], dim=1), full) < 1e-5, \
        "a 3-token chunk after 4 cached positions must see keys 0..4+i, as in the full forward pass"


def test_cache_takes_the_dtype_of_the_keys_under_autocast():
    """float32 weights under bfloat16 autocast: keys are computed in bfloat16, and so must the cache be."""
    model = random_model(tiny_config())
    tokens = random_tokens(model.config, 2, 12)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full, _ = model(tokens)
        model.setup_cache(batch_size=2)
        assert model.layers[0].attention.cache.k.dtype == torch.bfloat16
        cached = torch.cat([model(tokens[:, :8], start_pos=0)[0], model(tokens[:, 8:9], start_pos=8)[0],
                            model(tokens[:, 9:], start_pos=9)[0]], dim=1)
        model.drop_cache()
    assert max_abs_diff(cached, full) < 0.1, "cached bfloat16 decoding must follow the uncached bfloat16 pass"
