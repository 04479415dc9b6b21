"""llama_min.from_scratch's training pieces against the library versions they stand beside: cross-entropy
against torch.nn.functional.cross_entropy (values and gradients), AdamW against torch.optim.AdamW, clipping
against torch.nn.utils.clip_grad_norm_, and the loop against the losses train.py itself logs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lab.plots.scratch_loop import run_args, scratch_losses, train_py_losses
from llama_min.from_scratch.adamw import AdamW
from llama_min.from_scratch.clip import clip_grad_norm
from llama_min.from_scratch.cross_entropy import cross_entropy
from scripts import shakespeare_slice


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_matches_torch(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(40, 50, generator=g) * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (40,), generator=g)
    targets[::7] = -100
    mine = cross_entropy(logits, targets)
    theirs = F.cross_entropy(logits.float(), targets, ignore_index=-100)
    assert mine.dtype == torch.float32
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    (grad_mine,) = torch.autograd.grad(mine, logits)
    (grad_theirs,) = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(grad_mine, grad_theirs, rtol=1e-5, atol=1e-6)


def test_cross_entropy_is_stable_for_large_logits():
    logits = torch.tensor([[1e4, 0.0, -1e4], [3e4, 3e4, 0.0]])
    targets = torch.tensor([1, 0])
    mine = cross_entropy(logits, targets)
    assert torch.isfinite(mine)
    torch.testing.assert_close(mine, F.cross_entropy(logits, targets))


def test_cross_entropy_negative_control():
    """A loss without the max subtraction overflows where this one does not: the test can tell them apart."""
    logits = torch.tensor([[100.0, 0.0]])
    naive = logits.exp().sum(-1).log() - logits[0, 0]
    assert not torch.isfinite(naive).all() and torch.isfinite(cross_entropy(logits, torch.tensor([0])))


def test_adamw_matches_torch_over_several_steps():
    torch.manual_seed(0)
    mine_model, torch_model = nn.Linear(8, 6), nn.Linear(8, 6)
    torch_model.load_state_dict(mine_model.state_dict())
    settings = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8)
    mine = AdamW([{"params": [mine_model.weight], "weight_decay": 0.1},
                  {"params": [mine_model.bias], "weight_decay": 0.0}], **settings)
    theirs = torch.optim.AdamW([{"params": [torch_model.weight], "weight_decay": 0.1},
                                {"params": [torch_model.bias], "weight_decay": 0.0}], **settings, foreach=False)
    for step in range(5):
        x = torch.randn(4, 8)
        for model, opt in ((mine_model, mine), (torch_model, theirs)):
            for group in opt.param_groups:
                group["lr"] = 3e-2 / (step + 1)  # a changing rate: the decay must use the current one
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        torch.testing.assert_close(mine_model.weight, torch_model.weight, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(mine_model.bias, torch_model.bias, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(mine_model.weight, nn.Linear(8, 6).weight)


@pytest.mark.parametrize("max_norm", [0.05, 100.0])
def test_clip_grad_norm_matches_torch(max_norm):
    torch.manual_seed(0)
    a, b = [nn.Linear(5, 3) for _ in range(2)]
    b.load_state_dict(a.state_dict())
    x = torch.randn(7, 5)
    for m in (a, b):
        m(x).sum().backward()
    mine = clip_grad_norm(a.parameters(), max_norm)
    theirs = torch.nn.utils.clip_grad_norm_(b.parameters(), max_norm)
    torch.testing.assert_close(mine, theirs)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    if max_norm < 1:  # it clipped: the norm is now max_norm
        assert abs(torch.cat([p.grad.flatten() for p in a.parameters()]).norm() - max_norm) < 1e-4


def test_the_loop_reproduces_train_py(tmp_path):
    """train.py logs a loss per step; the loop, with this sub-package's cross-entropy, AdamW and clipping, on the
    same model, the same batches, the same schedule and the same weight-decay groups, gives the same losses
    (lab 11's comparison script, lab/plots/scratch_loop.py, on a slice of the corpus)."""
    shakespeare_slice(tmp_path / "corpus")
    args = run_args(tmp_path / "run", 6, tmp_path / "corpus" / "data", tmp_path / "corpus" / "cache")
    args += ["--vocab_size", "384"]  # a tokenizer the 60 kB slice can train
    logged = train_py_losses(args, tmp_path / "run")
    losses = scratch_losses(args)
    assert len(logged) == len(losses) == 6
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(logged), rtol=1e-4, atol=1e-5)
    assert losses[-1] < losses[0]  # it learned something: the comparison is not of two constants
