"""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization").

Adam (Kingma & Ba 2015, Algorithm 1) keeps two running averages per parameter, of the gradient g and of its
square, and steps along their bias-corrected ratio; step t counts from 1:

    m ← β1 m + (1 − β1) g            v ← β2 v + (1 − β2) g²
    m̂ = m / (1 − β1^t)               v̂ = v / (1 − β2^t)
    θ ← θ − lr · m̂ / (√v̂ + ε)

Weight decay added to the gradient (L2 regularisation) would be divided by √v̂ like the rest of it, so that
weights with large gradients decay less. AdamW decays θ directly instead, before the Adam step:

    θ ← θ − lr · λ · θ

This follows torch.optim.AdamW, which multiplies the decay by the learning rate lr (schedule included).
Algorithm 2 of the paper writes θ ← θ − η_t (α m̂ / (√v̂ + ε) + λ θ), with α the base rate and η_t the
schedule's multiplier: there the decay follows the schedule but not α. With a fixed α the two differ only in
what λ means (torch's λ is the paper's λ / α).
"""

import torch


class AdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient, with its group's lr, betas, eps and weight_decay.
        State per parameter, created at its first step: ``step`` (int), ``m`` and ``v`` (zeros like it)."""
        for group in self.param_groups:
            lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["step"] += 1
                t, m, v, g = state["step"], state["m"], state["v"], p.grad
                p.mul_(1 - lr * decay)  # decoupled weight decay: θ ← θ − lr·λ·θ
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                m_hat = m / (1 - beta1 ** t)
                v_hat = v / (1 - beta2 ** t)
                p.sub_(lr * m_hat / (v_hat.sqrt() + eps))
