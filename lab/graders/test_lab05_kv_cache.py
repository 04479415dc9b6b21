"""Lab 5, the KV cache and generation: ``KVCache.allocate``, ``KVCache.update``, ``filter_top_k``,
``filter_top_p`` and ``choose_next`` against the reference outputs stored in lab/fixtures/lab05.*."""

import pytest
import torch
import torch.nn.functional as F

from lab.graders.check import LabFixtures, check, fail
from llama_min.generation import choose_next, filter_top_k, filter_top_p
from llama_min.kv_cache import KVCache

LAB = LabFixtures(5)


def test_allocate():
    """allocate(2, 2, 8, 4, bfloat16): zero buffers k and v of shape (B, n_kv_heads, max_seq_len, head_dim)."""
    case = LAB.case("allocate")
    p = case.params
    cache = KVCache()
    cache.allocate(p["batch_size"], p["n_kv_heads"], p["max_seq_len"], p["head_dim"], torch.bfloat16)
    if not cache.active:
        fail("after allocate the cache is not active: set self.k and self.v")
    if cache.k is cache.v or cache.k.data_ptr() == cache.v.data_ptr():
        fail("self.k and self.v are the same tensor: allocate two buffers (the values would overwrite the keys)")
    check(cache.k, case, "KVCache.allocate(2, 2, 8, 4, bfloat16): self.k")
    check(cache.v, case, "KVCache.allocate(2, 2, 8, 4, bfloat16): self.v")


def empty_cache() -> KVCache:
    """A cache of 8 slots for batch 2, 2 kv heads of 4 features, made here (not by allocate)."""
    cache = KVCache()
    cache.k, cache.v = torch.zeros(2, 2, 8, 4), torch.zeros(2, 2, 8, 4)
    return cache


def test_update():
    """A prefill of 3 tokens, then 1, then 2: what each update returns (the cache up to its last written slot),
    then the buffers self.k and self.v."""
    case = LAB.case("update")
    cache = empty_cache()
    got = []
    for i, start in enumerate((0, 3, 4)):
        got += list(cache.update(start, case[f"k{i}"], case[f"v{i}"]))
    check(tuple(got) + (cache.k, cache.v), case,
          "KVCache.update at start 0 (3 tokens), 3 (1), 4 (2) -> (k, v) of each [0-5], then self.k, self.v [6-7]")


def test_update_fills_the_cache_exactly():
    """Writes that end exactly at the last slot (5 tokens, then 3, into 8 slots) are accepted, and the cache
    then holds all 8 positions."""
    cache = empty_cache()
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(2, 2, 8, 4, generator=g), torch.randn(2, 2, 8, 4, generator=g)
    try:
        cache.update(0, k[:, :, :5], v[:, :, :5])
        k_all, v_all = cache.update(5, k[:, :, 5:], v[:, :, 5:])
    except ValueError as e:
        fail(f"writing positions 5 … 7 into a cache of 8 slots raised ValueError ({e}). Likely mistake: refused a "
             "write that exactly fills the cache: slots 0 … max_seq_len − 1 all exist (refuse only end > "
             "max_seq_len)")
    if not (torch.equal(k_all, k) and torch.equal(v_all, v)):
        fail("after writing positions 0 … 4 and then 5 … 7 into a cache of 8 slots, update did not return all 8 "
             "positions as written")


def test_cached_steps_equal_full_attention():
    """Attention over the cache's return value, for a prefill of 3 positions and then 5 single steps, equals
    causal attention over all 8 positions at once (torch's scaled_dot_product_attention in both)."""
    g = torch.Generator().manual_seed(50)
    q, k, v = (torch.randn(2, 2, 8, 4, generator=g) for _ in range(3))
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    cache = empty_cache()
    outs = []
    for start, end in ((0, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8)):
        k_seen, v_seen = cache.update(start, k[:, :, start:end], v[:, :, start:end])
        if not torch.is_tensor(k_seen) or k_seen.shape != (2, 2, end, 4):
            fail(f"update(start={start}) with {end - start} new positions returned keys of shape "
                 f"{tuple(getattr(k_seen, 'shape', ()))}; attention needs all {end} positions so far, (2, 2, {end}, 4)")
        outs.append(F.scaled_dot_product_attention(q[:, :, start:end], k_seen, v_seen, is_causal=start == 0))
    wrong = [t for t in range(8) if not torch.allclose(torch.cat(outs, 2)[:, :, t], full[:, :, t], atol=1e-5)]
    if wrong:
        fail(f"attention over what update returns differs from attention over the whole sequence at positions "
             f"{wrong}: each update must return exactly the keys and values written so far, in their slots")


def test_update_refuses_overflow():
    """Writing slots 7 and 8 into a cache of 8 slots is an error that names the numbers."""
    case = LAB.case("update.overflow")
    cache = empty_cache()
    try:
        cache.update(case.params["start"], case["k"], case["v"])
    except ValueError:
        return
    except Exception as e:  # noqa: BLE001 - any other error is the student's to see
        fail(f"writing positions 7 … 8 into a cache of 8 slots raised {type(e).__name__}: {e}; expected a ValueError "
             "that names the positions and the cache size")
    fail("writing positions 7 … 8 into a cache of 8 slots raised nothing; expected a ValueError that names the "
         "positions and the cache size (slicing silently writes fewer positions)")


@pytest.mark.parametrize("k", [4, 20])
def test_top_k(k):
    case = LAB.case(f"top_k.{k}")
    try:
        kept = filter_top_k(case["logits"], k)
    except RuntimeError as e:
        fail(f"filter_top_k(logits (3, 12), k={k}) raised RuntimeError: {e}" + (
            ". Likely mistake: k may exceed the vocabulary: keep min(k, V) tokens" if k > 12 else ""))
    check(kept, case, f"filter_top_k(logits (3, 12), k={k})")


@pytest.mark.parametrize("p", [0.6, 0.05])
def test_top_p(p):
    case = LAB.case(f"top_p.{p}")
    check(filter_top_p(case["logits"], p), case, f"filter_top_p(logits (3, 12), p={p})")


def test_greedy():
    case = LAB.case("choose.greedy")
    try:
        ids = choose_next(case["logits"], 0.0, None, None, None)
    except RuntimeError as e:
        fail(f"choose_next(logits, temperature=0) raised RuntimeError: {e}. Likely mistake: temperature 0 means "
             "greedy: return the argmax (dividing the logits by 0 gives inf and NaN)")
    check(ids, case, "choose_next(logits (4, 12), temperature=0)")


def test_sampling_distribution():
    """20000 draws from each of two rows at temperature 0.7 with top_k 6 and top_p 0.9: their frequencies must
    match the reference's (within 0.03 per token), and no filtered-out token may ever be drawn."""
    case = LAB.case("choose.sampled")
    p = case.params
    n = p["samples"]
    logits = case["logits"]  # (R, V): each row is repeated n times, in one call
    R, V = logits.shape
    ids = choose_next(logits.repeat_interleave(n, dim=0), p["temperature"], p["top_k"], p["top_p"],
                      torch.Generator().manual_seed(p["seed"]))
    what = f"choose_next(logits, temperature=0.7, top_k=6, top_p=0.9) on {R} rows repeated {n} times each"
    if not torch.is_tensor(ids) or ids.shape != (R * n,) or ids.is_floating_point():
        fail(f"{what} must return integer token ids of shape ({R * n},); got "
             f"{type(ids).__name__} {tuple(getattr(ids, 'shape', ()))}")
    rows = [ids[r * n:(r + 1) * n] for r in range(R)]
    banned = {r: sorted(set(row.tolist()) - set(case["allowed"][r].nonzero().flatten().tolist()))
              for r, row in enumerate(rows)}
    frequencies = torch.stack([torch.bincount(row, minlength=V) for row in rows]).double() / n
    check(frequencies, case, f"the frequencies (row, token) of the tokens drawn by {what}")
    for r, tokens in banned.items():
        if tokens:
            fail(f"{what} drew tokens {tokens} from row {r}, which top-k/top-p remove")


def test_seeded_sampling_repeats():
    """Two runs with generators seeded alike draw the same tokens; another seed draws others."""
    logits = LAB.case("choose.sampled")["logits"][:1].expand(200, -1).clone()

    def draw(seed):
        return choose_next(logits.clone(), 1.0, None, None, torch.Generator().manual_seed(seed))
    first, again, other = draw(7), draw(7), draw(8)
    if not torch.equal(first, again) or torch.equal(first, other):
        fail("choose_next drew different tokens from two generators seeded alike (or the same from different "
             "seeds). Likely mistake: the generator argument is not used: pass it to torch.multinomial")
