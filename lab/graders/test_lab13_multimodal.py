"""Lab 13, the multimodal LLaMA-Adapter: ``VisualProjection`` (its layers and forward) and
``AdapterPrompt.add_image`` against the reference outputs stored in lab/fixtures/lab13.*."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lab.graders.check import LabFixtures, check, fail
from llama_min.peft.adapter import AdapterPrompt, VisualProjection

LAB = LabFixtures(13)
NO_GRAD = "keep it in the autograd graph (no .detach(), no torch.no_grad())"


def loaded(case) -> VisualProjection:
    p = case.params
    dtype = getattr(torch, p.get("dtype", "float32"))
    proj = VisualProjection(p["in_dim"], p["dim"], p["hidden"], dtype=dtype)
    want = {name.removeprefix("state."): case[name] for name in case.tensors if name.startswith("state.")}
    got = proj.state_dict()
    if set(got) != set(want):
        cause = ""
        if p["hidden"] and "net.weight" in got:
            cause = ("\nLikely mistake: the hidden width is ignored: hidden > 0 asks for Linear(in_dim, hidden), SiLU, "
                     "Linear(hidden, dim) as self.net, an nn.Sequential")
        elif not any(name.startswith("norm.") for name in got):
            cause = "\nLikely mistake: no LayerNorm as self.norm: the projection ends with nn.LayerNorm(dim)"
        fail(f"VisualProjection({p['in_dim']}, {p['dim']}, hidden={p['hidden']}) has the tensors {sorted(got)}; "
             f"expected {sorted(want)}{cause}")
    for name, value in want.items():
        if got[name].shape != value.shape:
            fail(f"VisualProjection's {name} has shape {tuple(got[name].shape)}; expected {tuple(value.shape)}")
    with torch.no_grad():
        proj.load_state_dict(want)
    return proj


@pytest.mark.parametrize("name", ["linear", "hidden", "zero"])
def test_projection(name):
    """Features (3, 12) to width 32: one Linear then LayerNorm; with hidden 20, Linear, SiLU, Linear, then
    LayerNorm; and zero features through a bias-free Linear (a constant vector, which LayerNorm maps to its bias)."""
    case = LAB.case(f"projection.{name}")
    with torch.no_grad():
        got = loaded(case)(case["features"])
    if name == "zero" and torch.is_tensor(got) and not got.isfinite().all():
        fail("zero features gave NaN or inf. Likely mistake: projection not zero-safe: a constant vector has "
             "variance 0, so normalise with LayerNorm (eps under the square root); a NaN here passes even a closed "
             "gate (0 · NaN = NaN), so the adapted model no longer starts at the base")
    check(got, case, f"VisualProjection(hidden={case.params['hidden']}).forward(features (3, 12))")


def test_projection_bfloat16():
    """A bfloat16 projection fed the float32 features an encoder gives."""
    case = LAB.case("projection.bfloat16")
    proj = loaded(case)
    try:
        with torch.no_grad():
            got = proj(case["features"])
    except RuntimeError as e:
        if "dtype" in str(e) or "type" in str(e):
            fail(f"a bfloat16 projection on float32 features raised: {e}. Likely mistake: features not cast to the "
                 "projection's dtype: cast them (.to(its dtype)) before the first Linear")
        raise
    check(got, case, "VisualProjection(dtype=bfloat16).forward(float32 features)")


def test_projection_layers():
    """The layers are made in the given dtype; a fresh projection gets a gradient in every tensor."""
    proj = VisualProjection(12, 32, 20, dtype=torch.bfloat16)
    wrong = sorted(name for name, p in proj.named_parameters() if p.dtype != torch.bfloat16)
    if wrong:
        fail(f"VisualProjection(..., dtype=bfloat16) made {wrong} in another dtype: create the layers with the given "
             "device and dtype")
    torch.manual_seed(0)
    proj = VisualProjection(12, 32, 0)
    out = proj(torch.rand(3, 12))
    if not torch.is_tensor(out) or not out.requires_grad:
        fail(f"the projection's output does not require grad. Likely mistake: the projection gets no gradient: {NO_GRAD}")
    (out * torch.randn(out.shape)).sum().backward()
    for name, p in proj.named_parameters():
        if p.grad is None or p.grad.abs().max() == 0:
            fail(f"{name} got no gradient. Likely mistake: the projection gets no gradient: {NO_GRAD}")


def call_add_image(case, visual: torch.Tensor):
    p = case.params
    wk, wv = (nn.Linear(case["wk"].shape[1], case["wk"].shape[0], bias=False) for _ in range(2))
    with torch.no_grad():
        wk.weight.copy_(case["wk"])
        wv.weight.copy_(case["wv"])
    adapter = SimpleNamespace(n_heads=p["n_heads"], n_kv_heads=p["n_kv_heads"], head_dim=p["head_dim"])
    try:
        return AdapterPrompt.add_image(adapter, case["k"], case["v"], wk.requires_grad_(False),
                                       wv.requires_grad_(False), visual)
    except RuntimeError as e:
        if "size of tensor" in str(e) or "must match" in str(e):
            fail(f"add_image raised: {e}. Likely mistake: the kv heads are not repeated: wk(I_p) has n_kv_heads = "
                 f"{p['n_kv_heads']} heads, the prompt keys n_heads = {p['n_heads']}; query head h reads kv head "
                 "h // (H / H_kv): .repeat_interleave(groups, dim=1)")
        raise


def test_add_image():
    """Prompt keys/values (1, 4, 6, 8), images (3, 32), 2 kv heads for 4 query heads: two (3, 4, 6, 8)."""
    case = LAB.case("add_image")
    with torch.no_grad():
        got = call_add_image(case, case["visual"])
    check(got, case, "add_image(k, v, wk, wv, visual (3, 32)) -> (k, v), each (B, n_heads, K, d)")


def test_add_image_passes_the_gradient_to_the_image():
    case = LAB.case("add_image")
    visual = case["visual"].requires_grad_(True)
    k, v = call_add_image(case, visual)
    if not (torch.is_tensor(k) and torch.is_tensor(v) and (k.requires_grad or v.requires_grad)):
        fail(f"add_image's keys and values do not require grad. Likely mistake: the image gets no gradient: {NO_GRAD}")
    ((k * torch.randn(k.shape)).sum() + (v * torch.randn(v.shape)).sum()).backward()
    if visual.grad is None or visual.grad.abs().max() == 0:
        fail(f"the image got no gradient from add_image's output. Likely mistake: the image gets no gradient: {NO_GRAD}")
