"""Lab 8, LLaMA-Adapter: ``AdapterPrompt`` (its initialisation, prompt_kv and forward) against the reference
outputs stored in lab/fixtures/lab08.*."""

import pytest
import torch
from torch import nn

from lab.graders.check import LabFixtures, check, fail
from llama_min.peft.adapter import AdapterPrompt

LAB = LabFixtures(8)


def projections(case) -> tuple[nn.Linear, nn.Linear]:
    wk, wv = (nn.Linear(case["wk"].shape[1], case["wk"].shape[0], bias=False).to(case["wk"].dtype) for _ in range(2))
    with torch.no_grad():
        wk.weight.copy_(case["wk"])
        wv.weight.copy_(case["wv"])
    return wk, wv


def loaded(case, gate_tanh: bool) -> AdapterPrompt:
    p = case.params
    adapter = AdapterPrompt(p["adapter_len"], p["dim"], p["n_heads"], p["n_kv_heads"], gate_tanh,
                            dtype=case["prompt"].dtype)
    values = {"prompt": case["prompt"]} | ({"gate": case["gate"]} if "gate" in case.tensors else {})
    for name, value in values.items():
        tensor = getattr(adapter, name, None)
        if not isinstance(tensor, nn.Parameter) or tensor.shape != value.shape:
            cause = (". Likely mistake: one scalar gate instead of per head" if name == "gate" and tensor is not None
                     and tensor.numel() == 1 else "")
            fail(f"self.{name} must be an nn.Parameter of shape {tuple(value.shape)}; got {type(tensor).__name__} "
                 f"{tuple(getattr(tensor, 'shape', ()))}{cause}")
        with torch.no_grad():
            tensor.copy_(value)
    return adapter


def test_init():
    """A fresh adapter: prompts (K, dim) ~ N(0, 1), one zero gate per head, an output of exactly zero."""
    torch.manual_seed(0)
    adapter = AdapterPrompt(adapter_len=10, dim=32, n_heads=4, n_kv_heads=2, gate_tanh=False)
    for name, want in (("n_heads", 4), ("n_kv_heads", 2), ("head_dim", 8), ("gate_tanh", False)):
        if getattr(adapter, name, None) != want:
            fail(f"self.{name} is {getattr(adapter, name, 'missing')!r}; expected {want!r}")
    gate = getattr(adapter, "gate", None)
    if not isinstance(gate, nn.Parameter):
        fail(f"self.gate must be an nn.Parameter; got {type(gate).__name__}")
    if gate.numel() == 1:
        fail(f"self.gate has shape {tuple(gate.shape)}. Likely mistake: one scalar gate instead of per head: the gate "
             "has one entry per head, shape (1, n_heads, 1, 1), broadcast over (B, H, T, d)")
    if tuple(gate.shape) != (1, 4, 1, 1):
        fail(f"self.gate has shape {tuple(gate.shape)}; expected (1, n_heads, 1, 1) = (1, 4, 1, 1)")
    if gate.detach().abs().max() != 0:
        fail(f"self.gate starts at {gate.detach().flatten().tolist()}. Likely mistake: adapter gate not zero: "
             "zero-init attention starts every gate at 0, so the adapted model is exactly the base model")
    prompt = getattr(adapter, "prompt", None)
    if not isinstance(prompt, nn.Parameter) or tuple(prompt.shape) != (10, 32):
        fail(f"self.prompt must be an nn.Parameter (adapter_len, dim) = (10, 32); got {type(prompt).__name__} "
             f"{tuple(getattr(prompt, 'shape', ()))}")
    std = prompt.detach().std().item()
    if not 0.8 < std < 1.2:
        fail(f"the prompts have std {std:.3f}" + (". Likely mistake: prompts initialised to zero" if std == 0 else "")
             + "; draw them from N(0, 1) (torch.randn): wk and wv expect inputs of RMS-normalised scale")
    wk, wv = nn.Linear(32, 16, bias=False), nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        out = adapter(torch.randn(2, 4, 5, 8), wk, wv)
    if not torch.is_tensor(out) or out.shape != (2, 4, 5, 8) or out.abs().max() != 0:
        fail("a fresh adapter must return exactly zeros of shape (B, H, T, d) = (2, 4, 5, 8) (its gate is zero)")


def test_init_dtype():
    adapter = AdapterPrompt(4, 16, 2, 1, True, dtype=torch.bfloat16)
    if adapter.prompt.dtype != torch.bfloat16 or adapter.gate.dtype != torch.bfloat16:
        fail(f"AdapterPrompt(..., dtype=bfloat16) made prompt {adapter.prompt.dtype}, gate {adapter.gate.dtype}; "
             "create both with the given device and dtype")


def test_prompt_kv():
    """K = 6 prompts of dim 32 through wk/wv with 2 kv heads, for 4 query heads."""
    case = LAB.case("prompt_kv")
    wk, wv = projections(case)
    with torch.no_grad():
        check(loaded(case, False).prompt_kv(wk, wv), case, "prompt_kv(wk, wv) -> (k, v), each (1, n_heads, K, d)")


@pytest.mark.parametrize("name", ["plain", "tanh", "bfloat16"])
def test_forward(name):
    """Queries (2, 4, 5, 8) with gates [0.5, −1, 2, 0.25]: gate · softmax(q P_kᵀ / √d) P_v; in bfloat16 with
    48 prompts, the softmax in float32."""
    case = LAB.case(f"forward.{name}")
    gate_tanh = case.params["gate_tanh"]
    wk, wv = projections(case)
    with torch.no_grad():
        check(loaded(case, gate_tanh)(case["q"], wk, wv), case,
              f"AdapterPrompt(gate_tanh={gate_tanh}).forward(q (2, 4, 5, 8) {case['q'].dtype}, wk, wv)")


def backward(loss: torch.Tensor) -> None:
    if not loss.requires_grad:
        fail("with wk and wv frozen, the adapter's output does not require grad. Likely mistake: the gate gets no "
             "gradient (and the prompt gets no gradient): keep the output in the autograd graph (no .detach())")
    loss.backward()


def test_gradients_reach_the_gates_and_prompts():
    """With wk and wv frozen: a fresh adapter (gates 0) gives the gates a gradient and the prompts none; once
    the gates are open both get one; the frozen projections never do."""
    torch.manual_seed(0)
    adapter = AdapterPrompt(6, 32, 4, 2, False)
    wk, wv = nn.Linear(32, 16, bias=False).requires_grad_(False), nn.Linear(32, 16, bias=False).requires_grad_(False)
    q = torch.randn(2, 4, 5, 8)
    for name in ("gate", "prompt"):
        if not getattr(adapter, name).requires_grad:
            fail(f"self.{name} does not require grad. Likely mistake: the {name} gets no gradient: the prompts and "
                 "the gates are the adapter's trainable parameters")
    backward(adapter(q, wk, wv).sum())
    if adapter.gate.grad is None or adapter.gate.grad.abs().max() == 0:
        fail("a fresh adapter (gates 0): the loss gives the gates no gradient. Likely mistake: the gate gets no "
             "gradient (detached, or not multiplied into the output)")
    with torch.no_grad():
        adapter.gate.fill_(0.5)
    adapter.zero_grad()
    backward(adapter(q, wk, wv).sum())
    for name in ("gate", "prompt"):
        grad = getattr(adapter, name).grad
        if grad is None or grad.abs().max() == 0:
            fail(f"with the gates open, the loss gives the {name}s no gradient. Likely mistake: the {name} gets no "
                 "gradient: keep the adapter's output in the autograd graph (no .detach())")
    if wk.weight.grad is not None or wv.weight.grad is not None:
        fail("the frozen projections wk, wv received a gradient")
