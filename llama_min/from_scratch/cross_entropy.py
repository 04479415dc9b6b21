"""Cross-entropy, the loss a language model trains on (the negative log-likelihood of Radford et al. 2018, eq. 1).

For logits z (one row per position) and the target token y:

    −log softmax(z)[y] = logsumexp(z) − z[y],        logsumexp(z) = m + log Σ_j exp(z_j − m),  m = max_j z_j

Subtracting the row's maximum changes nothing mathematically and keeps exp from overflowing: exp(z_j − m) ≤ 1,
and the largest term is exactly 1, so the sum never underflows to 0 either. The loss is the mean over the
positions that count: a target equal to ``ignore_index`` (prompt tokens, padding) is left out of the sum and
of the count. torch.nn.functional.cross_entropy computes the same; tests/test_from_scratch.py compares them.
"""

import torch


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """logits: (N, V) any float dtype; targets: (N,) int64 token ids or ignore_index.
    Returns the float32 scalar mean of logsumexp(z) − z[y] over the counted positions (NaN when none counts)."""
    z = logits.float()  # (N, V): the sum of exponentials needs float32 even for bfloat16 logits
    m = z.max(dim=-1, keepdim=True).values  # (N, 1)
    logsumexp = m.squeeze(-1) + (z - m).exp().sum(dim=-1).log()  # (N,)
    counted = targets != ignore_index  # (N,)
    picked = z.gather(-1, torch.where(counted, targets, 0)[:, None]).squeeze(-1)  # z[y], (N,)
    return ((logsumexp - picked) * counted).sum() / counted.sum()
