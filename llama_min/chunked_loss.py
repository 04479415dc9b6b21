"""The output head and the cross-entropy loss together, a chunk of positions at a time.

The plain path (model.py, ``forward`` in eval mode) is

    logits = h Wᵀ                       (N, V) float32, N = B·T positions, V = vocabulary
    loss   = mean over counted n of  logsumexp(logits_n) − logits_n[target_n]

and autograd keeps the (N, V) logits, and the softmax cross-entropy builds another tensor that size
for backward: at Llama 3's 128,256-token vocabulary, a batch of 4 × 512 positions holds 2 × 1 GB. The
gradient of this loss has a closed form (softmax minus the one-hot target):

    ∂loss/∂logits_n = (softmax(logits_n) − onehot(target_n)) / n_counted     (0 for ignored positions)
    ∂loss/∂h = (∂loss/∂logits) W          ∂loss/∂W = (∂loss/∂logits)ᵀ h

so ``ChunkedHeadLoss`` computes, for one chunk of positions at a time, the logits, the chunk's share
of the loss, and at once its share of both gradients; the chunk's logits are then dropped. Backward
only scales the stored gradients by the incoming one. The largest tensor is (chunk, V), and the work is
the same three matrix products the plain path does (head forward, and the two of its backward; a frozen
head, as in parameter-efficient fine-tuning, skips ∂loss/∂W and the (V, dim) tensor it would keep). The
same idea as the "fused linear cross-entropy" of Liger-Kernel (Hsu et al. 2024, section 3.3).
``tests/test_chunked_loss.py`` proves loss and gradients equal the plain path's.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # target value whose position does not count in the loss (the same as model.py's)
# A chunk holds up to 32 MiB of float32 logits (a small vocabulary fits a whole batch in one chunk), but
# never fewer than 256 positions: thinner chunks make the three products too thin to run at full speed
# (at a 128k vocabulary 32 MiB would be 65 positions; docs/performance.md).
CHUNK_ELEMENTS = 2**23
MIN_CHUNK_POSITIONS = 256


class ChunkedHeadLoss(torch.autograd.Function):
    """loss = cross_entropy(h Wᵀ, targets), mean over positions whose target is not IGNORE_INDEX.
    h: (N, dim); weight: (V, dim); targets: (N,) int64. Returns a float32 scalar."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        counted = targets != IGNORE_INDEX
        n_counted = counted.sum()
        chunk = max(MIN_CHUNK_POSITIONS, CHUNK_ELEMENTS // weight.shape[0])
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        grad_weight = None  # a frozen head (LoRA, LLaMA-Adapter, ...) needs no (V, dim) gradient: not even its memory
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, h.shape[0], chunk):
            h_c, t_c, keep = h[start:start + chunk], targets[start:start + chunk], counted[start:start + chunk]
            logits = (h_c @ weight.T).float()  # (chunk, V)
            safe_t = t_c.clamp(min=0)[:, None]  # an ignored position's target is any valid index; its share is 0
            target_logit = logits.gather(1, safe_t)[:, 0]
            # The softmax once, in place (no second (chunk, V) tensor): its sum gives the logsumexp too.
            row_max = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(row_max).exp_()
            total = probs.sum(dim=-1, keepdim=True)  # (chunk, 1)
            loss += (((row_max + total.log())[:, 0] - target_logit) * keep).sum()  # logsumexp − the target's logit
            g = probs.div_(total).scatter_add_(1, safe_t, -torch.ones_like(safe_t, dtype=probs.dtype))  # in [−1, 1]
            # Each row's factor keep / n_counted multiplies the thin (chunk, dim) side of the products.
            scale = (keep / n_counted)[:, None]
            grad_h[start:start + chunk] = ((g.to(weight.dtype) @ weight) * scale).to(h.dtype)
            if grad_weight is not None:  # accumulated inside the product, in float32: no (V, dim) temporary
                grad_weight.addmm_(g.T, h_c.to(grad_weight.dtype) * scale)
        ctx.save_for_backward(grad_h, None if grad_weight is None else grad_weight.to(weight.dtype))
        return loss / n_counted

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_weight = ctx.saved_tensors
        return (grad_h * grad_loss.to(grad_h.dtype),
                None if grad_weight is None else grad_weight * grad_loss.to(grad_weight.dtype), None)


def chunked_head_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """h: (B, T, dim), weight: (V, dim), targets: (B, T) -> the mean cross-entropy of h Wᵀ, never
    holding more than one chunk's logits (see ChunkedHeadLoss)."""
    return ChunkedHeadLoss.apply(h.flatten(0, 1), weight, targets.flatten())
