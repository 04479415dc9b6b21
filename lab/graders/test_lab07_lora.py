"""Lab 7, LoRA: ``LoRALinear`` (its initialisation, delta_weight, forward, merge and unmerge) against the
reference outputs stored in lab/fixtures/lab07.*."""

import math

import pytest
import torch
from torch import nn

from lab.graders.check import LabFixtures, check, fail
from llama_min.peft.lora import LoRALinear

LAB = LabFixtures(7)


def wrapped(case, dropout: float = 0.0) -> tuple[nn.Linear, LoRALinear]:
    """A LoRALinear around a bias-free Linear holding the case's W, with the case's A and B."""
    p = case.params
    base = nn.Linear(p["in"], p["out"], bias=False).to(case["W"].dtype)
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


@pytest.mark.parametrize("name", ["delta_weight", "delta_weight.bfloat16"])
def test_delta_weight(name):
    """(alpha / r)·B A in float32, from float32 and from bfloat16 A and B."""
    case = LAB.case(name)
    check(wrapped(case)[1].delta_weight(), case, f"delta_weight() with r = 4, alpha = 8, {case['A'].dtype} A and B")


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


def test_merge_bfloat16():
    """merge() of a bfloat16 W: the sum is taken in float32 and rounded once into W."""
    case = LAB.case("merge.bfloat16")
    _, lora = wrapped(case)
    with torch.no_grad():
        lora.merge()
    check(lora.weight.detach(), case, "W (bfloat16) after merge()")


def test_gradients_reach_a_and_b():
    """With the base frozen: a fresh layer (B = 0) gives B a gradient and A none; once B is non-zero both get
    one; the frozen W never does."""
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=False)
    base.weight.requires_grad_(False)
    lora = LoRALinear(base, 4, 8.0, 0.0)
    x = torch.randn(3, 24)
    for name in ("lora_a", "lora_b"):
        if not getattr(lora, name).requires_grad:
            fail(f"{name} does not require grad. Likely mistake: {name} gets no gradient: A and B are the "
                 "trainable parameters (nn.Parameter, requires_grad=True)")
    backward(lora(x).pow(2).sum())
    if lora.lora_b.grad is None or lora.lora_b.grad.abs().max() == 0:
        fail("a fresh LoRALinear (B = 0): the loss gives lora_b no gradient. Likely mistake: lora_b gets no gradient "
             "(the low-rank path is detached or computed without autograd)")
    with torch.no_grad():
        lora.lora_b.normal_()
    lora.zero_grad()
    backward(lora(x).pow(2).sum())
    for name in ("lora_a", "lora_b"):
        grad = getattr(lora, name).grad
        if grad is None or grad.abs().max() == 0:
            fail(f"with B non-zero, the loss gives {name} no gradient. Likely mistake: {name} gets no gradient: "
                 "the update must stay in the autograd graph (no .detach(), no torch.no_grad())")
    if base.weight.grad is not None:
        fail("the frozen weight W received a gradient: LoRA trains A and B only")


def backward(loss: torch.Tensor) -> None:
    if not loss.requires_grad:
        fail("with the base weight frozen, the output of LoRALinear does not require grad. Likely mistake: the "
             "update gets no gradient: the low-rank path must stay in the autograd graph (no .detach(), no "
             "torch.no_grad(), A and B nn.Parameters that require grad)")
    loss.backward()


class Shapes(torch.overrides.TorchFunctionMode):
    """Records the shape of every tensor a torch function returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if torch.is_tensor(t):
                self.shapes.append(tuple(t.shape))
        return out


def test_forward_never_forms_b_a():
    """In training mode the forward applies A, then B (x Aᵀ Bᵀ): no tensor of W's size (out, in) is made."""
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(24, 40, bias=False), 4, 8.0, 0.0)
    x = torch.randn(3, 5, 24)
    with Shapes() as seen:
        lora(x)
    full = [s for s in seen.shapes if s in ((40, 24), (24, 40))]
    if full:
        fail(f"LoRALinear.forward made a tensor of shape {full[0]}, the size of W. Likely mistake: builds the full "
             "(out, in) matrix B A: apply A, then B, to x (two thin matmuls cost r·(in + out) per token)")
