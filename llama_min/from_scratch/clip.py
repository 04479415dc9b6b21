"""Clipping the gradient by its global norm (Pascanu et al. 2013, "On the difficulty of training recurrent
neural networks", Algorithm 1; LLaMA section 2.3 clips at 1.0).

The norm is taken over all gradients at once, as if they were one vector: ‖g‖ = sqrt(Σ_p Σ_i g_{p,i}²). When it
exceeds max_norm every gradient is scaled by the same factor max_norm / ‖g‖, so the update keeps its direction
and only its length is capped. torch.nn.utils.clip_grad_norm_ computes the same (with 1e-6 added to the norm
in the factor, kept here); tests/test_from_scratch.py compares them.
"""

from collections.abc import Iterable

import torch


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale the gradients of ``parameters`` in place so that their global L2 norm is at most max_norm.
    Returns the norm before clipping, a float32 scalar. Parameters without a gradient are skipped."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.stack([g.float().pow(2).sum() for g in grads]).sum().sqrt()  # ‖g‖ over every tensor at once
    factor = (max_norm / (total + 1e-6)).clamp(max=1.0)  # 1 when the norm is already small enough
    for g in grads:
        g.mul_(factor.to(g.dtype))
    return total
