"""Lab 11, the training loop from scratch: ``cross_entropy``, ``AdamW.step``, ``clip_grad_norm`` and ``train``
in llama_min/from_scratch/, against lab/fixtures/lab11.* (made with torch's own functions).

The loop is graded with torch's cross-entropy, clipping and AdamW in place of yours, on a bigram model of
torch's layers (graders/tiny_lm.py), so that a mistake in one piece is reported once, where it is.
"""

import pytest
import torch
import torch.nn.functional as F

import llama_min.from_scratch.loop as loop_module
from lab.graders.check import LabFixtures, check, fail
from lab.graders.tiny_lm import TinyLM
from llama_min.from_scratch.adamw import AdamW
from llama_min.from_scratch.clip import clip_grad_norm
from llama_min.from_scratch.cross_entropy import cross_entropy

LAB = LabFixtures(11)
IGNORE = -100


def loss_of(logits, targets, what):
    __tracebackhide__ = True
    try:
        return cross_entropy(logits, targets)
    except (IndexError, RuntimeError) as e:
        if "out of bounds" in str(e):
            fail(f"{what} failed on the targets equal to -100: {str(e).splitlines()[0]}\nLikely mistake: targets "
                 "equal to ignore_index must not be looked up: count only the other positions (e.g. look up a "
                 "valid id such as 0 there and multiply by the mask)")
        raise


@pytest.mark.parametrize("name", ["plain", "large", "bfloat16"])
def test_cross_entropy(name):
    """Logits (12, 10) with three targets ignored: ordinary values, values of ±600 (exp overflows float32 unless
    the maximum is subtracted), and bfloat16 logits."""
    case = LAB.case(f"cross_entropy.{name}")
    logits = case["logits"]
    what = f"cross_entropy(logits {tuple(logits.shape)} {str(logits.dtype).removeprefix('torch.')}, targets)"
    check(loss_of(logits, case["targets"], what), case, what)


def test_cross_entropy_gradient():
    """The gradient with respect to the logits, by autograd through your function."""
    case = LAB.case("cross_entropy.gradient")
    logits = case["logits"].requires_grad_()
    loss = loss_of(logits, case["targets"], "cross_entropy")
    if not (torch.is_tensor(loss) and loss.requires_grad):
        fail("cross_entropy's result carries no gradient: build it from tensor operations on the logits (no .item(), "
             "numpy, detach or torch.no_grad), so that backward reaches the model")
    grad, = torch.autograd.grad(loss, logits)
    check(grad, case, "d cross_entropy / d logits")


def test_adamw_step():
    """Four steps on a (6, 4) weight (weight decay 0.5) and a (4,) bias (none), at learning rates 0.1, 0.05, 0.02,
    0.01; a third parameter in the weight's group never gets a gradient."""
    case = LAB.case("adamw")
    p = case.params
    weight, bias = torch.nn.Parameter(case["weight"]), torch.nn.Parameter(case["bias"])
    frozen = torch.nn.Parameter(torch.ones(3))
    opt = AdamW([{"params": [weight, frozen], "weight_decay": p["weight_decay"]}, {"params": [bias], "weight_decay": 0.0}],
                lr=float(case["lrs"][0]), betas=tuple(p["betas"]), eps=p["eps"])
    outs = []
    for s, lr in enumerate(case["lrs"].tolist()):
        for group in opt.param_groups:
            group["lr"] = lr
        weight.grad, bias.grad = case["grad_weight"][s], case["grad_bias"][s]
        try:
            opt.step()
        except (TypeError, AttributeError) as e:
            fail(f"AdamW.step failed: {type(e).__name__}: {e}\nLikely mistake: a parameter whose .grad is None "
                 "(frozen, or unused this step) must be skipped")
        outs.append(torch.cat([weight.detach().flatten(), bias.detach().flatten()]))
    if not torch.equal(frozen.detach(), torch.ones(3)):
        fail("AdamW.step changed a parameter that has no gradient (its .grad is None): skip it, weight decay "
             "included")
    check(torch.stack(outs), case, "the weight and bias after each of 4 AdamW steps (flattened, one row per step)")


@pytest.mark.parametrize("name", ["clips", "below"])
def test_clip_grad_norm(name):
    """Gradients of a (5, 3) and a (3,) tensor, global norm about 9: clipped to 1.0, and left alone under 100."""
    case = LAB.case(f"clip.{name}")
    params = [torch.nn.Parameter(torch.zeros_like(case[f"grad.{i}"])) for i in range(2)]
    for i, p in enumerate(params):
        p.grad = case[f"grad.{i}"]
    norm = clip_grad_norm(params, case.params["max_norm"])
    check((torch.as_tensor(norm, dtype=torch.float32), *[p.grad for p in params]), case,
          f"clip_grad_norm(max_norm={case.params['max_norm']}) -> (the returned norm, the two gradients after)")


@pytest.mark.parametrize("name", ["accumulate", "schedule"])
def test_train_loop(name, monkeypatch):
    """4 steps of 2 micro-batches (the second counts fewer targets) on a bigram model, with torch's AdamW:
    at lr 0.05 clipping at 0.5, and with a changing learning rate and no clipping."""
    case = LAB.case(f"loop.{name}")
    p = case.params
    monkeypatch.setattr(loop_module, "cross_entropy", lambda z, y, ignore_index=IGNORE:
                        F.cross_entropy(z.float(), y, ignore_index=ignore_index))
    monkeypatch.setattr(loop_module, "clip_grad_norm", torch.nn.utils.clip_grad_norm_)
    model = TinyLM(p["vocab_size"], p["dim"])
    model.load_state_dict({k: case[f"init.{k}"] for k in model.state_dict()})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0, betas=(0.9, 0.95), weight_decay=0.1)
    steps = [[(case[f"step{s}.{b}.x"], case[f"step{s}.{b}.y"]) for b in range(p["micro_batches"])]
             for s in range(p["steps"])]
    lrs = p["lrs"]
    losses = loop_module.train(model, steps, optimizer, lambda s: lrs[min(max(s, 0), len(lrs) - 1)], p["grad_clip"])
    if not isinstance(losses, list) or not all(isinstance(v, float) for v in losses):
        fail(f"train returned {type(losses).__name__} {losses!r:.80}; expected a list of Python floats, one per step "
             "(loss.item(): a tensor would keep each step's graph alive)")
    got = (torch.tensor(losses, dtype=torch.float64), *[q.detach() for q in model.parameters()])
    check(got, case, f"train(4 steps x 2 micro-batches, lrs {lrs}, grad_clip {p['grad_clip']}) -> (the losses, "
          "the model's parameters after)")
