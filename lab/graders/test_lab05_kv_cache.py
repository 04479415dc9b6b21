"""Lab 5, the KV cache and generation: ``KVCache.allocate``, ``KVCache.update``, ``filter_top_k``,
``filter_top_p`` and ``choose_next`` against the reference outputs stored in lab/fixtures/lab05.*."""

import pytest
import torch

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
    check(cache.k, case, "KVCache.allocate(2, 2, 8, 4, bfloat16): self.k")
    check(cache.v, case, "KVCache.allocate(2, 2, 8, 4, bfloat16): self.v")


def empty_cache() -> KVCache:
    """A cache of 8 slots for batch 2, 2 kv heads of 4 features, made here (not by allocate)."""
    cache = KVCache()
    cache.k, cache.v = torch.zeros(2, 2, 8, 4), torch.zeros(2, 2, 8, 4)
    return cache


def test_update():
    """A prefill of 3 tokens, then 1, then 2: after each, the cache up to the last written slot."""
    cache = empty_cache()
    for step in range(3):
        case = LAB.case(f"update.{step}")
        start, k = case.params["start"], case["k"]
        check(cache.update(start, k, case["v"]), case,
              f"KVCache.update(start={start}, k/v {tuple(k.shape)}) (after {step} earlier updates) -> (k, v)")
    check((cache.k, cache.v), LAB.case("update.buffer"), "the cache's buffers (self.k, self.v) after the three updates")


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
    """20000 draws at temperature 0.7 with top_k 6 and top_p 0.9: their frequencies must match the distribution
    (within 0.03 per token), and no filtered-out token may ever be drawn."""
    case = LAB.case("choose.sampled")
    p = case.params
    n = p["samples"]
    ids = choose_next(case["logits"].expand(n, -1).clone(), p["temperature"], p["top_k"], p["top_p"],
                      torch.Generator().manual_seed(55))
    what = "choose_next(logits, temperature=0.7, top_k=6, top_p=0.9)"
    if not torch.is_tensor(ids) or ids.shape != (n,) or ids.is_floating_point():
        fail(f"{what} must return integer token ids of shape ({n},) for {n} rows; got "
             f"{type(ids).__name__} {tuple(getattr(ids, 'shape', ()))}")
    expected = case.output()[0]
    banned = sorted(set(ids.tolist()) & set((expected == 0).nonzero().flatten().tolist()))
    frequencies = torch.bincount(ids, minlength=expected.numel()).double() / n
    check(frequencies, case, f"the frequencies of the tokens drawn by {what}")
    if banned:
        fail(f"{what} drew tokens {banned}, which top-k/top-p remove")
