"""Stand-ins for other labs' functions, so that a grader tests one lab only.

``Attention.forward`` (lab 4) calls ``apply_rotary`` (lab 3), the cache's ``update`` (lab 5) and a prompt
adapter (lab 8). Its grader replaces them with stand-ins that hold no answer code: they replay the reference
outputs stored for exactly the inputs the grader's case feeds, and when they receive anything else they
say what they expected, naming the mistake when they recognise it (the values before the rotation, say).
"""

from __future__ import annotations

import torch
from torch import nn

from .check import Case, GraderError, matches

TOL = {"atol": 1e-5, "rtol": 1e-4}


def same(got, want: torch.Tensor) -> bool:
    return torch.is_tensor(got) and matches(got, want, TOL)


def replay_rotary(case: Case, cos: torch.Tensor, sin: torch.Tensor):
    """An ``apply_rotary`` that knows the q and k of the case (``rotary.q_in`` → ``rotary.q_out``, same for k)."""
    q_in, k_in, v_in = case["rotary.q_in"], case["rotary.k_in"], case["rotary.v_in"]

    def apply_rotary(x, cos_, sin_):
        __tracebackhide__ = True
        if not (same(cos_, cos) and same(sin_, sin)):
            raise GraderError("apply_rotary received other cos/sin than the ones Attention.forward was given: "
                              "pass its cos and sin arguments through unchanged")
        if same(x, q_in):
            return case["rotary.q_out"].to(x.dtype)
        if same(x, k_in):
            return case["rotary.k_out"].to(x.dtype)
        if same(x, v_in):
            raise GraderError("apply_rotary was called on v. Likely mistake: RoPE applied to v: only queries and "
                              "keys are rotated; values carry content, not position")
        if torch.is_tensor(x) and tuple(x.shape) not in (tuple(q_in.shape), tuple(k_in.shape)):
            raise GraderError(f"apply_rotary received x of shape {tuple(x.shape)}; it takes (B, T, heads, d): "
                              f"{tuple(q_in.shape)} for q, {tuple(k_in.shape)} for k. Likely mistake: view the "
                              "projections as (B, T, heads, d), rotate, and only then transpose to (B, heads, T, d)")
        raise GraderError("apply_rotary received a tensor that is neither q = wq(x) nor k = wk(x) viewed as "
                          "(B, T, heads, d): check the projections and the view")
    return apply_rotary


class ReplayCache(nn.Module):
    """A KV cache holding the case's earlier positions: ``update`` checks the new keys and values and returns
    the stored full cache (``cache.k_full``, ``cache.v_full``)."""

    def __init__(self, case: Case):
        super().__init__()
        self.case, self.start = case, case.params["start"]
        self.calls = 0

    @property
    def active(self) -> bool:
        return True

    def update(self, start, k, v):
        __tracebackhide__ = True
        self.calls += 1
        new_k, new_v = self.case["cache.k_new"], self.case["cache.v_new"]
        if start != self.start:
            raise GraderError(f"self.cache.update was called with start={start}; this case's tokens go to cache "
                              f"slot {self.start}: pass Attention.forward's `start` through")
        if torch.is_tensor(k) and k.shape != new_k.shape:
            raise GraderError(f"self.cache.update received k of shape {tuple(k.shape)}; the cache takes "
                              f"(B, n_kv_heads, T, d) = {tuple(new_k.shape)}: transpose to (B, heads, T, d) first")
        if same(k, self.case["rotary.k_in"].transpose(1, 2)):
            raise GraderError("self.cache.update received the keys before the rotation. Likely mistake: the cache "
                              "stores rotated keys: apply_rotary to k before self.cache.update")
        if not (same(k, new_k) and same(v, new_v)):
            raise GraderError("self.cache.update received other keys or values than the reference's: rotate k "
                              "(not v), transpose both to (B, n_kv_heads, T, d), then update the cache")
        return self.case["cache.k_full"], self.case["cache.v_full"]


class ReplayAdapter(nn.Module):
    """A prompt adapter that checks the queries it receives and returns the case's ``adapter.out``."""

    def __init__(self, case: Case, wk: nn.Module, wv: nn.Module):
        super().__init__()
        self.case, self.wk, self.wv = case, [wk], [wv]  # in lists: not registered as submodules twice

    def forward(self, q, wk, wv, visual=None):
        __tracebackhide__ = True
        if wk is not self.wk[0] or wv is not self.wv[0] or visual is not None:
            raise GraderError("the prompt adapter must be called as self.prompt_adapter(q, self.wk, self.wv, visual), "
                              "visual being Attention.forward's own argument (None here)")
        rotated = self.case["rotary.q_out"].transpose(1, 2)
        if same(q, self.case["rotary.q_in"].transpose(1, 2)):
            raise GraderError("the prompt adapter received the queries before the rotation: it takes q after "
                              "apply_rotary, as (B, n_heads, T, d)")
        if not same(q, rotated):
            raise GraderError(f"the prompt adapter received other queries than the rotated q as (B, n_heads, T, d) "
                              f"{tuple(rotated.shape)}")
        return self.case["adapter.out"]


def position_stamp(x, cos, sin):
    """A stand-in for ``apply_rotary`` that is not RoPE but, like it, changes x by its positions' angles:
    x times 1 + mean(cos) of its position. A cached step that skips it, or gives it another position's
    angles, differs from the full forward."""
    return x * (1 + cos.mean(-1))[..., None, None]


class GrowingCache(nn.Module):
    """A cache with the contract of ``KVCache.update`` and none of its code: it appends what it is given and
    returns everything so far."""

    def __init__(self):
        super().__init__()
        self.k = self.v = None
        self.length = 0

    @property
    def active(self) -> bool:
        return True

    def update(self, start, k, v):
        __tracebackhide__ = True
        if start != self.length:
            raise GraderError(f"self.cache.update was called with start={start} after {self.length} cached "
                              f"positions: pass Attention.forward's `start` through")
        self.k = k if self.k is None else torch.cat((self.k, k), 2)
        self.v = v if self.v is None else torch.cat((self.v, v), 2)
        self.length += k.shape[2]
        return self.k, self.v
