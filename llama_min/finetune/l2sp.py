"""L2-SP: pull the fine-tuned weights toward the pretrained ones (Li, Grandvalet & Davoine 2018,
"Explicit Inductive Bias for Transfer Learning with Convolutional Networks", section 3, the L2-SP
penalty).

    Ω(θ) = λ · Σ_tensors ‖θ − θ₀‖²        added to the objective;   ∂Ω/∂θ = 2λ (θ − θ₀)

The trainer adds the gradient 2λ(θ − θ₀) straight to the parameters' gradients, once per optimiser step
(``add_to_gradients``): the same update as putting Ω into the loss, without autograd keeping θ − θ₀ for
the backward pass of every micro-batch. ``L2SP()`` gives Ω itself, for measuring.

The paper writes the factor as α/2 (so λ = α/2 here) and adds plain weight decay β/2·‖w‖² on the
layers that are new for the target task; here the new tensors (PEFT modules) get β = 0, see below.

Plain weight decay pulls the weights toward zero, which for a pretrained model means toward forgetting
what it knew; L2-SP pulls them toward their starting point θ₀ instead, so the fine-tuned model stays
close to the base (less forgetting) while the data can still move it where it matters.

Only the *trained base tensors* are anchored: parameters that require grad and whose name is a tensor
of the base model (the keys a base checkpoint stores). θ₀ is copied for those only: frozen tensors cannot
move, so they need no anchor and get no copy; PEFT parameters (LoRA's A and B, adapter prompts, ...)
are not base tensors and are not anchored (their starting point is a random or zero initialisation,
not knowledge to keep). The extra memory is one copy of the trained base tensors.

θ₀ is the weights at the moment the penalty is built, i.e. the pretrained checkpoint: build it after
loading ``--init_from`` and before the first optimiser step. A resumed run builds it the same way,
before it copies its own trained weights in (training/state.py, ``restore_run``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..checkpoint import stored_state_dict
from ..config import ModelConfig
from ..model import Llama


def base_tensor_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Name -> shape of every tensor a base checkpoint of ``config`` stores, counted on the meta device
    (no memory). PEFT modules keep the base keys of the weights they wrap, so these names pick out
    the base tensors inside an adapted model too."""
    with torch.device("meta"):
        return {name: t.shape for name, t in stored_state_dict(Llama(config)).items()}


class L2SP:
    """The penalty λ·Σ‖θ − θ₀‖² over the trained base tensors of ``model``, anchored at their
    current values. Call it to get the penalty (a scalar tensor in float32, with grad)."""

    def __init__(self, model: nn.Module, lam: float):
        if not lam >= 0:
            raise ValueError(f"L2-SP strength lambda must be >= 0, got {lam}; e.g. --l2sp 0.01")
        self.lam = float(lam)
        base = base_tensor_shapes(model.config)
        # named_parameters() lists a tied embedding/output weight once, so it is anchored once.
        trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad and name in base]
        if not trained:
            raise ValueError("L2-SP has no trained base tensor to anchor: every base weight is frozen "
                             "(as with --method lora|adapter|bottleneck alone); train base tensors "
                             "(--method full|partial, --train_norms) or drop --l2sp")
        self.names = [name for name, _ in trained]
        self.params = [p for _, p in trained]
        self.anchors = [p.detach().clone() for p in self.params]  # θ₀, one copy of the trained tensors only

    def __call__(self) -> torch.Tensor:
        """λ · Σ ‖θ − θ₀‖², computed in float32 (differences of bfloat16 weights lose their digits)."""
        total = sum((p.float() - p0.float()).pow(2).sum() for p, p0 in zip(self.params, self.anchors))
        return self.lam * total

    @torch.no_grad()
    def add_to_gradients(self) -> None:
        """grad += 2λ(θ − θ₀) for every anchored tensor (a tensor without a gradient gets this alone)."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        torch._foreach_add_(grads, torch._foreach_sub([p.float() for p in self.params], [a.float() for a in self.anchors]),
                            alpha=2 * self.lam)

    def numel(self) -> int:
        """Number of anchored values (the memory the anchor costs, in elements)."""
        return sum(p0.numel() for p0 in self.anchors)
