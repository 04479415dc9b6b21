"""Lab 7, LoRA: ``LoRALinear`` (its initialisation, delta_weight, forward, merge and unmerge) against the
reference outputs stored in lab/fixtures/lab07.*."""

import math

import torch
from torch import nn

from lab.graders.check import LabFixtures, check, fail
from llama_min.peft.lora import LoRALinear

LAB = LabFixtures(7)


def wrapped(case, dropout: float = 0.0) -> tuple[nn.Linear, LoRALinear]:
    """A LoRALinear around a bias-free Linear holding the case's W, with the case's A and B."""
    p = case.params
    base = nn.Linear(p["in"], p["out"], bias=False)
    with torch.no_grad():
        base.weight.copy_(case["W"])
    lora = LoRALinear(base, p["rank"], p["alpha"], dropout)
    for name, value in (("lora_a", case["A"]), ("lora_b", case["B"])):
        tensor = getattr(lora, name, None)
        if not isinstance(tensor, nn.Parameter) or tensor.shape != value.shape:
            fail(f"self.{name} must be an nn.Parameter of shape {tuple(value.shape)} (A: (r, in), B: (out, r)); got "
                 f"{type(tensor).__name__} {tuple(getattr(tensor, 'shape', ()))}")
        with torch.no_grad():
            tensor.copy_(value)
    return base, lora


def test_init():
    """A fresh LoRALinear: the frozen weight shared, A like nn.Linear's weight, B zero, scale alpha / r, and
    an output exactly equal to the frozen layer's."""
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=False)
    lora = LoRALinear(base, rank=4, alpha=8.0, dropout=0.0)
    for name, want in (("in_features", 24), ("out_features", 40), ("rank", 4), ("alpha", 8.0), ("merged", False)):
        if getattr(lora, name, None) != want:
            fail(f"self.{name} is {getattr(lora, name, 'missing')!r}; expected {want!r}")
    if getattr(lora, "scale", None) != 2.0:
        fail(f"self.scale is {getattr(lora, 'scale', 'missing')!r} for alpha 8, rank 4; expected alpha / rank = 2.0"
             + (". Likely mistake: scaled by α instead of α/r" if getattr(lora, "scale", None) == 8.0 else ""))
    if lora.weight is not base.weight:
        fail("self.weight is not base.weight. Likely mistake: the frozen weight is copied; share the Parameter "
             "(self.weight = base.weight): a tied output head stays tied and no memory is doubled")
    A, B = lora.lora_a, lora.lora_b
    if tuple(A.shape) != (4, 24) or tuple(B.shape) != (40, 4):
        fail(f"lora_a {tuple(A.shape)}, lora_b {tuple(B.shape)}; expected A (r, in) = (4, 24), B (out, r) = (40, 4)")
    if B.detach().abs().max() != 0:
        fail("lora_b is not zero. Likely mistake: LoRA B random: B starts at zeros, so that B A = 0 and the adapted "
             "layer starts as exactly the frozen one")
    bound = 1 / math.sqrt(24)  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)), as nn.Linear's weight
    if A.detach().abs().max() == 0:
        fail("lora_a is zero. Likely mistake: A initialised to zeros: with B = 0 as well, neither ever gets a "
             "gradient; A is initialised like nn.Linear's weight (kaiming_uniform_ with a = sqrt(5))")
    if A.detach().abs().max() > bound * 1.0001 or A.detach().std() < bound / math.sqrt(3) * 0.7:
        fail(f"lora_a has values in ±{A.detach().abs().max():.3f}, std {A.detach().std():.3f}; nn.Linear's "
             f"initialisation (kaiming_uniform_ with a = sqrt(5)) draws U(−{bound:.3f}, {bound:.3f}), std "
             f"{bound / math.sqrt(3):.3f}")
    x = torch.randn(3, 24)
    with torch.no_grad():
        if not torch.equal(lora(x), base(x)):
            fail("a fresh LoRALinear does not give exactly the frozen layer's output (B A must be 0 at the start)")


def test_init_follows_the_weight():
    """The new tensors take the frozen weight's dtype; a base with a bias is refused."""
    base = nn.Linear(8, 6, bias=False).to(torch.bfloat16)
    lora = LoRALinear(base, 2, 4.0, 0.0)
    if lora.lora_a.dtype != torch.bfloat16 or lora.lora_b.dtype != torch.bfloat16:
        fail(f"around a bfloat16 weight, lora_a is {lora.lora_a.dtype} and lora_b {lora.lora_b.dtype}; create them "
             "with the weight's device and dtype")
    try:
        LoRALinear(nn.Linear(8, 6, bias=True), 2, 4.0, 0.0)
    except ValueError:
        return
    fail("LoRALinear(nn.Linear(8, 6, bias=True), ...) must raise ValueError: it wraps bias-free projections only")


def test_delta_weight():
    case = LAB.case("delta_weight")
    check(wrapped(case)[1].delta_weight(), case, "delta_weight() with r = 4, alpha = 8")


def test_forward():
    case = LAB.case("forward")
    with torch.no_grad():
        check(wrapped(case)[1](case["x"]), case, "LoRALinear(in 24, out 40, r 4, alpha 8) of x (3, 5, 24)")


def test_dropout_only_on_the_low_rank_path():
    """Training mode with dropout 0.5 and B = 0: the output is exactly W x (dropout acts on A's input only)."""
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=False)
    lora = LoRALinear(base, 4, 8.0, 0.5).train()
    with torch.no_grad():
        lora.lora_b.zero_()
        x = torch.randn(3, 24)
        if not torch.allclose(lora(x), base(x), atol=1e-6, rtol=0):
            fail("in training mode with dropout 0.5 and B = 0 the output is not W x: dropout belongs on the input "
                 "of the low-rank path only, (alpha / r)·B A dropout(x); W x is never dropped")


def test_merge_is_idempotent():
    """merge() twice: W + (alpha / r)·B A once; then the forward is the same as before merging."""
    case = LAB.case("merge")
    _, lora = wrapped(case)
    with torch.no_grad():
        lora.merge()
        lora.merge()
    check(lora.weight.detach(), case, "W after merge(); merge()")
    if not lora.merged:
        fail("after merge() self.merged is not True")
    forward_case = LAB.case("merged_forward")
    with torch.no_grad():
        check(lora(forward_case["x"]), forward_case, "the forward after merge()")


def test_unmerge_is_idempotent():
    """merge(), then unmerge() twice: W back to the frozen weight."""
    case = LAB.case("unmerge")
    _, lora = wrapped(case)
    with torch.no_grad():
        lora.merge()
        lora.unmerge()
        lora.unmerge()
    check(lora.weight.detach(), case, "W after merge(); unmerge(); unmerge()")
    if lora.merged:
        fail("after unmerge() self.merged is still True")
