"""Lab 5, the KV cache and generation: the mistakes students make in ``KVCache.allocate``, ``KVCache.update``,
``filter_top_k``, ``filter_top_p`` and ``choose_next``, and the inputs that show them."""

import torch

from llama_min.generation import filter_top_k, filter_top_p

from ..mutations import m
from . import Case, generator, randn

ALLOCATE, UPDATE = "llama_min/kv_cache.py::KVCache.allocate", "llama_min/kv_cache.py::KVCache.update"
TOP_K, TOP_P, CHOOSE = ("llama_min/generation.py::filter_top_k", "llama_min/generation.py::filter_top_p",
                        "llama_min/generation.py::choose_next")
SLOTS = "write at slots start … start+T−1"
ORDER = "z / temperature first, then top-k, then top-p, then the softmax"

MUTATIONS = [
    m("cache_layout", 5, ALLOCATE, "the cache layout is (batch, n_kv_heads, max_seq_len, head_dim)",
      ("shape = (batch_size, n_kv_heads, max_seq_len, head_dim)",
       "shape = (batch_size, max_seq_len, n_kv_heads, head_dim)"),
      why="the layout k and v have after the transpose in attention"),
    m("cache_dtype_ignored", 5, ALLOCATE, "Allocate in the dtype asked for",
      ("self.k = torch.zeros(shape, dtype=dtype, device=device)", "self.k = torch.zeros(shape, device=device)"),
      ("self.v = torch.zeros(shape, dtype=dtype, device=device)", "self.v = torch.zeros(shape, device=device)"),
      why="a bfloat16 model keeps a bfloat16 cache"),
    m("cache_k_v_shared", 5, ALLOCATE, "self.k and self.v are the same tensor",
      ("self.v = torch.zeros(shape, dtype=dtype, device=device)", "self.v = self.k"),
      why="allocate two buffers: the values would overwrite the keys"),
    m("cache_returns_whole_buffer", 5, UPDATE, "update returns the whole buffer",
      ("return self.k[:, :, :end], self.v[:, :, :end]", "return self.k, self.v"),
      why="return the cache up to the last written slot, self.k[:, :, :start + T] (the slots after it are zeros)"),
    m("cache_returns_only_new", 5, UPDATE, "update returns only the new keys",
      ("return self.k[:, :, :end], self.v[:, :, :end]", "return self.k[:, :, start:end], self.v[:, :, start:end]"),
      why="return everything cached so far, slots 0 … start+T−1"),
    m("cache_wrong_slot", 5, UPDATE, "cache written at the wrong slot",
      ("self.k[:, :, start:end] = k", "self.k[:, :, :end - start] = k"),
      ("self.v[:, :, start:end] = v", "self.v[:, :, :end - start] = v"), why="(always from slot 0): " + SLOTS),
    m("cache_one_slot_late", 5, UPDATE, "cache written at the wrong slot",
      ("self.k[:, :, start:end] = k", "self.k[:, :, start + 1:end + 1] = k"),
      ("self.v[:, :, start:end] = v", "self.v[:, :, start + 1:end + 1] = v"), why="(one too far): " + SLOTS),
    m("cache_values_not_written", 5, UPDATE, "the values are not written", ("self.v[:, :, start:end] = v", "pass"),
      why="write k into self.k AND v into self.v"),
    m("cache_no_overflow_check", 5, UPDATE, "expected a ValueError", ("if end > self.k.shape[2]:", "if False:"),
      why="slicing past the end silently writes fewer positions"),
    m("cache_capacity_off_by_one", 5, UPDATE, "refused a write that exactly fills the cache",
      ("if end > self.k.shape[2]:", "if end >= self.k.shape[2]:"),
      why="slots 0 … max_seq_len − 1 all exist: refuse only end > max_seq_len"),
    m("top_k_keeps_k_minus_1", 5, TOP_K, "keeps k − 1 tokens", ("logits < kth", "logits <= kth"),
      why="the k-th largest itself stays (mask values strictly below it)"),
    m("top_k_beyond_vocabulary", 5, TOP_K, "k may exceed the vocabulary", ("min(k, logits.shape[-1])", "k"),
      why="keep min(k, V) tokens"),
    m("top_k_smallest", 5, TOP_K, "keeps the k smallest logits", ("dim=-1).values", "dim=-1, largest=False).values"),
      ("logits < kth", "logits > kth"), why="top-k keeps the k LARGEST"),
    m("top_k_keeps_only_the_best", 5, TOP_K, "keeps only the largest logit", ("values[:, -1:]", "values[:, :1]"),
      why="the threshold is the k-th largest value, values[:, -1:] of topk's descending values"),
    m("top_p_drops_crossing_token", 5, TOP_P, "the token that brings the mass to p is dropped",
      ("mass_before = torch.cumsum(probs, dim=-1) - probs", "mass_before = torch.cumsum(probs, dim=-1)"),
      why="keep a token while the mass BEFORE it is below p (cumsum − prob), so the nucleus reaches at least p and "
          "never is empty"),
    m("top_p_ascending", 5, TOP_P, "sorted ascending", ("descending=True", "descending=False"),
      why="the nucleus is made of the MOST probable tokens (descending=True)"),
    m("top_p_sorted_order", 5, TOP_P, "the drop mask is in sorted order",
      ("drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)", "drop = drop_sorted"),
      why="scatter it back to vocabulary order (order holds the vocabulary index of each sorted position)"),
    m("top_p_on_logits", 5, TOP_P, "the nucleus is measured on logits, not probabilities",
      ("probs = torch.softmax(sorted_logits, dim=-1)", "probs = sorted_logits"),
      why="p is a probability mass: softmax the sorted logits first"),
    m("sampling_temperature_times", 5, CHOOSE, "logits multiplied by the temperature",
      ("logits = logits / temperature", "logits = logits * temperature"), why="they are divided by it (z / T)"),
    m("sampling_no_temperature", 5, CHOOSE, "the temperature is not applied", ("logits = logits / temperature", "pass"),
      why=ORDER),
    m("sampling_temperature_after_filters", 5, CHOOSE, "temperature applied after top-k/top-p",
      ("logits = logits / temperature", "pass"),
      ("probs = torch.softmax(logits, dim=-1)", "probs = torch.softmax(logits / temperature, dim=-1)"),
      why="top-p measures the mass of the tempered distribution: " + ORDER),
    m("sampling_top_k_ignored", 5, CHOOSE, "top_k is ignored", ("if top_k is not None:", "if False:"), why=ORDER),
    m("sampling_top_p_ignored", 5, CHOOSE, "top_p is ignored",
      ("if top_p is not None and top_p < 1.0:", "if False:"), why=ORDER),
    m("sampling_top_p_before_top_k", 5, CHOOSE, "top-p applied before top-k",
      ("logits = filter_top_k(logits, top_k)", "logits = logits"),
      ("logits = filter_top_p(logits, top_p)",
       "logits = filter_top_p(logits, top_p)\n    if top_k is not None:\n        logits = filter_top_k(logits, top_k)"),
      why=ORDER),
    m("sampling_greedy_divides_by_zero", 5, CHOOSE, "temperature 0 means greedy",
      ("if temperature == 0:", "if temperature < 0:"), why="return the argmax; dividing by 0 gives inf and NaN"),
    m("sampling_greedy_argmin", 5, CHOOSE, "argmin instead of argmax",
      ("logits.argmax(dim=-1)", "logits.argmin(dim=-1)"),
      why="greedy decoding takes the most likely token"),
    m("sampling_generator_ignored", 5, CHOOSE, "the generator argument is not used",
      ("torch.multinomial(probs, num_samples=1, generator=generator)", "torch.multinomial(probs, num_samples=1)"),
      why="pass it to torch.multinomial, so that a seeded run draws the same tokens again"),
]

SETTINGS = {"temperature": 0.7, "top_k": 6, "top_p": 0.9}


def update_run(code, t):
    """Three updates in a row on a cache made here (not by allocate), returning what the last one returns and
    the buffers: step s of the grader compares the s-th return value."""
    cache = code.KVCache()
    cache.k, cache.v = torch.zeros(2, 2, 8, 4), torch.zeros(2, 2, 8, 4)
    outs = [cache.update(start, t[f"k{i}"], t[f"v{i}"]) for i, start in enumerate((0, 3, 4))]
    return (*outs[0], *outs[1], *outs[2], cache.k, cache.v)


def cases():
    g = generator(5)
    B, H_kv, S, d = 2, 2, 8, 4
    yield Case("allocate", {}, lambda code, t: allocated(code, B, H_kv, S, d),
               params={"batch_size": B, "n_kv_heads": H_kv, "max_seq_len": S, "head_dim": d},
               dtype_cause="Allocate in the dtype asked for.",
               shape_causes={str([B, S, H_kv, d]): "the cache layout is (batch, n_kv_heads, max_seq_len, head_dim), "
                             "the layout k and v have after the transpose in attention"})
    steps = {}
    for i, T in enumerate((3, 1, 2)):
        steps[f"k{i}"], steps[f"v{i}"] = randn(g, B, H_kv, T, d), randn(g, B, H_kv, T, d)
    yield Case("update", steps, update_run,
               hint="write at slots start … start+T−1, return the cache up to the last written slot; every update "
                    "writes into the preallocated self.k, self.v",
               shape_causes={str([B, H_kv, S, d]): "update returns the whole buffer: return the cache up to the "
                             "last written slot, self.k[:, :, :start + T] (the slots after it are still zeros)"})
    yield Case("update.overflow", {"k": randn(g, B, H_kv, 2, d), "v": randn(g, B, H_kv, 2, d)},
               lambda code, t: torch.zeros(()), params={"start": 7, "capacity": S})
    logits = randn(g, 3, 12, std=2.0)
    for k in (4, 20):
        yield Case(f"top_k.{k}", {"logits": logits}, lambda code, t, k=k: code.filter_top_k(t["logits"], k),
                   params={"k": k}, hint="keep the k largest logits of each row, −inf elsewhere")
    for p in (0.6, 0.05):
        yield Case(f"top_p.{p}", {"logits": logits}, lambda code, t, p=p: code.filter_top_p(t["logits"], p),
                   params={"p": p}, hint="sort descending, keep a token while the probability mass before it is < p")
    yield Case("choose.greedy", {"logits": randn(g, 4, 12, std=2.0)},
               lambda code, t: code.choose_next(t["logits"], 0.0, None, None, None), params={"temperature": 0.0},
               hint="temperature 0 is greedy: argmax over the vocabulary")
    # Two rows chosen so that every ordering or filter mistake gives frequencies of its own (each pair of
    # mistakes differs by more than the 0.03 tolerance in one of the rows): in the first, top-p over the whole
    # distribution keeps more than six tokens (top-k ignored differs from top-p before top-k), in the second
    # fewer (top-p before top-k differs from top-p ignored), and the tempered and untempered nuclei differ.
    rows = torch.tensor([[-0.36, 0.60, -0.70, -0.52, 0.91, -1.64, 0.46, -0.13, 0.23, 0.0, -0.81, 1.36],
                         [-1.02, -0.13, -1.81, -0.28, 1.58, 0.66, -2.45, 2.22, -2.29, 3.76, 3.22, 3.18]])
    allowed = torch.softmax(filter_top_p(filter_top_k(rows / 0.7, 6), 0.9), -1) > 0
    yield Case("choose.sampled", {"logits": rows, "allowed": allowed}, sampled,
               params=SETTINGS | {"samples": 20000, "seed": 55}, tol={"atol": 0.03, "rtol": 0.0},
               hint=ORDER + ", then torch.multinomial with the generator given")


def allocated(code, *shape):
    cache = code.KVCache()
    cache.allocate(*shape, torch.bfloat16)
    return cache.k


def sampled(code, t):
    """The frequencies (R, V) of 20000 draws from each of the R rows of logits (R, V), drawn in one call on the
    rows repeated 20000 times each, with the grader's seed."""
    n, (R, V) = 20000, t["logits"].shape
    ids = code.choose_next(t["logits"].repeat_interleave(n, dim=0), generator=torch.Generator().manual_seed(55),
                           **SETTINGS)
    return torch.stack([torch.bincount(ids[r * n:(r + 1) * n], minlength=V) for r in range(R)]).double() / n

