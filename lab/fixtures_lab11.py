"""Lab 11's fixtures (the training loop from scratch): the reference outputs of cross_entropy, AdamW.step,
clip_grad_norm and train, and of typical wrong versions, each written out here independently.

The loop's cases train lab/graders/tiny_lm.py's TinyLM with torch's own AdamW, cross-entropy and clipping (the
grader gives the student's loop those, so that only the loop is graded there)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama_min.from_scratch import loop as loop_module
from llama_min.from_scratch.adamw import AdamW
from llama_min.from_scratch.clip import clip_grad_norm
from llama_min.from_scratch.cross_entropy import cross_entropy

from .graders.tiny_lm import TinyLM

IGNORE = -100


def ce_cases(w) -> None:
    g = torch.Generator().manual_seed(110)
    N, V = 12, 10
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[1, 5, 6]] = IGNORE
    for name, scale, dtype in (("plain", 2.0, torch.float32), ("large", 200.0, torch.float32),
                               ("bfloat16", 3.0, torch.bfloat16)):
        logits = (torch.randn(N, V, generator=g) * scale).to(dtype)
        z = logits.float()
        c = w.case(f"cross_entropy.{name}", {"logits": logits, "targets": targets}, cross_entropy(logits, targets),
                   hint="mean over the counted positions of logsumexp(z) − z[y], logsumexp computed as m + log Σ "
                        "exp(z − m) with m the row maximum, in float32",
                   dtype_cause="Return a float32 loss: compute in float32 whatever the logits' dtype.")
        counted = targets != IGNORE
        per = torch.logsumexp(z, -1) - z.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)
        if name == "large":
            naive = z.exp().sum(-1).log() - z.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)
            c.mistake("overflow", (naive * counted).sum() / counted.sum(),
                      "exp overflows: subtract each row's maximum before exp (logsumexp(z) = m + log Σ exp(z − m))")
            continue
        c.mistake("sum", (per * counted).sum(), "the loss is summed: it is the MEAN over the counted positions")
        c.mistake("mean_over_all", (per * counted).sum() / N,
                  "the mean counts the ignored positions: divide by the number of targets that are not ignore_index")
        wrong_axis = torch.logsumexp(z, 0)[targets.clamp(min=0)] - z.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)
        c.mistake("axis", (wrong_axis * counted).sum() / counted.sum(),
                  "log-sum-exp over the wrong axis: normalise each position's row of logits (dim=-1, the vocabulary)")
        c.mistake("sign", -(per * counted).sum() / counted.sum(),
                  "the sign is wrong: the loss is −log p(y) = logsumexp(z) − z[y], positive")
        if dtype == torch.bfloat16:
            mb = logits.max(-1, keepdim=True).values  # the same formula, every operation in bfloat16
            low = mb.squeeze(-1) + (logits - mb).exp().sum(-1).log() - logits.gather(
                -1, targets.clamp(min=0)[:, None]).squeeze(-1)
            c.mistake("in_bf16", ((low * counted).sum() / counted.sum()).float(),
                      "computed in bfloat16: cast the logits to float32 first (the sum of exponentials needs it)")
    logits = (torch.randn(N, V, generator=g) * 2).requires_grad_()
    grad, = torch.autograd.grad(F.cross_entropy(logits, targets, ignore_index=IGNORE), logits)
    c = w.case("cross_entropy.gradient", {"logits": logits.detach(), "targets": targets}, grad,
               hint="d loss / d z = (softmax(z) − onehot(y)) / n_counted on counted rows, 0 on ignored ones")
    mean_all, = torch.autograd.grad(F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum") / N, logits)
    c.mistake("mean_over_all", mean_all, "the mean counts the ignored positions: divide by the number of targets "
              "that are not ignore_index")


def adamw_reference(steps, *, decoupled=True, decay_lr=True, bias_correction=True, decay_after=False,
                    eps_inside=False, shared_t=False):
    """Parameters after each step of an AdamW written out with switches for the typical mistakes."""
    w0, b0, grads, lrs, settings = steps
    (b1, b2), eps = settings["betas"], settings["eps"]
    params = [w0.clone(), b0.clone()]
    decays = [settings["weight_decay"], 0.0]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    t_global, outs = 0, []
    for s, lr in enumerate(lrs):
        for i, p in enumerate(params):
            t_global += 1
            t = t_global if shared_t else s + 1
            g = grads[i][s].clone()
            lam = decays[i]
            if not decoupled:
                g = g + lam * p
            elif not decay_after:
                p.mul_(1 - (lr if decay_lr else 1.0) * lam)
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            mh = m[i] / (1 - b1 ** t) if bias_correction else m[i]
            vh = v[i] / (1 - b2 ** t) if bias_correction else v[i]
            p.sub_(lr * mh / ((vh + eps).sqrt() if eps_inside else vh.sqrt() + eps))
            if decoupled and decay_after:
                p.mul_(1 - lr * lam)
        outs.append(torch.cat([p.flatten() for p in params]))
    return torch.stack(outs)


def adamw_cases(w) -> None:
    g = torch.Generator().manual_seed(111)
    w0, b0 = torch.randn(6, 4, generator=g), torch.randn(4, generator=g)
    n = 4
    grads = (torch.randn(n, 6, 4, generator=g), torch.randn(n, 4, generator=g) * 0.01)
    lrs = [0.1, 0.05, 0.02, 0.01]
    settings = {"betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.5}
    weight, bias = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    frozen = torch.nn.Parameter(torch.ones(3))  # in the group, never given a gradient
    opt = AdamW([{"params": [weight, frozen], "weight_decay": settings["weight_decay"]},
                 {"params": [bias], "weight_decay": 0.0}], lr=lrs[0], betas=settings["betas"], eps=settings["eps"])
    outs = []
    for s, lr in enumerate(lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        weight.grad, bias.grad = grads[0][s].clone(), grads[1][s].clone()
        opt.step()
        outs.append(torch.cat([weight.detach().flatten(), bias.detach().flatten()]))
    expected = torch.stack(outs)
    assert torch.allclose(expected, adamw_reference((w0, b0, grads, lrs, settings)), atol=1e-6)
    c = w.case("adamw", {"weight": w0, "bias": b0, "grad_weight": grads[0], "grad_bias": grads[1],
                         "lrs": torch.tensor(lrs)}, expected, params=settings, tol={"atol": 1e-6, "rtol": 1e-5},
               hint="per parameter: θ ← θ(1 − lr·λ); m, v running averages of g and g²; θ ← θ − lr·m̂/(√v̂ + ε) with "
                    "m̂ = m/(1 − β1^t), v̂ = v/(1 − β2^t), t its own step count from 1")
    steps = (w0, b0, grads, lrs, settings)
    c.mistake("l2", adamw_reference(steps, decoupled=False), "weight decay added to the gradient (L2, Adam's "
              "original form): AdamW decays θ itself, θ ← θ − lr·λ·θ, outside the adaptive step")
    c.mistake("decay_without_lr", adamw_reference(steps, decay_lr=False), "the decay is not multiplied by the "
              "learning rate: θ ← θ − lr·λ·θ (torch.optim.AdamW; it follows the schedule)")
    c.mistake("no_bias_correction", adamw_reference(steps, bias_correction=False), "no bias correction: m and v "
              "start at 0, so divide them by (1 − β1^t) and (1 − β2^t)")
    c.mistake("decay_after", adamw_reference(steps, decay_after=True), "the decay is applied after the Adam step; "
              "torch.optim.AdamW (and this lab) decays θ first, then takes the step")
    c.mistake("eps_inside", adamw_reference(steps, eps_inside=True), "ε inside the square root: the denominator is "
              "√v̂ + ε")
    c.mistake("shared_t", adamw_reference(steps, shared_t=True), "one step counter for all parameters: t counts "
              "each parameter's own steps (state per parameter), 1 at its first step")


def clip_cases(w) -> None:
    g = torch.Generator().manual_seed(112)
    grads = [torch.randn(5, 3, generator=g), torch.randn(3, generator=g) * 3]
    for name, max_norm in (("clips", 1.0), ("below", 100.0)):
        params = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads]
        for p, t in zip(params, grads):
            p.grad = t.clone()
        norm = clip_grad_norm(params, max_norm)
        c = w.case(f"clip.{name}", {"grad.0": grads[0], "grad.1": grads[1]}, (norm, *[p.grad for p in params]),
                   params={"max_norm": max_norm},
                   hint="‖g‖ = sqrt(Σ over every tensor of Σ g²); if it exceeds max_norm scale every gradient by "
                        "max_norm / (‖g‖ + 1e-6); return ‖g‖ before clipping")
        total = torch.cat([t.flatten() for t in grads]).norm()
        if name == "below":
            c.mistake("always", (total, *[t * max_norm / (total + 1e-6) for t in grads]),
                      "gradients scaled although their norm is below max_norm: the factor is min(1, max_norm / ‖g‖)")
            continue
        per = [t * min(1.0, max_norm / (t.norm().item() + 1e-6)) for t in grads]
        c.mistake("per_tensor", (total, *per), "each tensor clipped by its own norm: the norm is global, over all "
                  "gradients at once, and one factor scales them all")
        factor = max_norm / (total + 1e-6)
        c.mistake("after", (total * factor, *[t * factor for t in grads]),
                  "the norm returned is the one after clipping: return ‖g‖ before scaling")
        c.mistake("squared", (total ** 2, *[t * min(1.0, max_norm / (total.item() ** 2)) for t in grads]),
                  "the squared norm: ‖g‖ = sqrt(Σ g²)")


def torch_loss(logits, targets, ignore_index=IGNORE):
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)


def loop_reference(make, steps, lrs, clip, *, zero_grad="after_step", weighting="share", lr_shift=0, clip_when="before",
                   record="all"):
    """Losses and final parameters of a loop written out with switches for the typical mistakes."""
    model, opt = make()
    losses = []
    for s, batches in enumerate(steps):
        if lr_shift is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[min(s + lr_shift, len(lrs) - 1)]
        n = sum(int((y != IGNORE).sum()) for _, y in batches)
        total = 0.0
        for x, y in batches:
            loss = torch_loss(model(x)[0].flatten(0, 1), y.flatten())
            factor = {"share": int((y != IGNORE).sum()) / n, "mean": 1 / len(batches), "none": 1.0}[weighting]
            (loss * factor).backward()
            total = loss.item() * factor + (total if record == "all" else 0.0)
        if zero_grad == "before_step":
            opt.zero_grad()
        if clip and clip_when == "before":
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if zero_grad == "after_step":
            opt.zero_grad()
        losses.append(total)
    return (torch.tensor(losses, dtype=torch.float64), *[p.detach().clone() for p in model.parameters()])


def loop_cases(w) -> None:
    g = torch.Generator().manual_seed(113)
    V, dim = 12, 8
    torch.manual_seed(113)
    init = TinyLM(V, dim).state_dict()
    steps = []
    for _ in range(4):
        batches = []
        for b in range(2):
            x = torch.randint(0, V, (2, 5), generator=g)
            y = torch.randint(0, V, (2, 5), generator=g)
            if b == 1:
                y[:, :3] = IGNORE  # the second micro-batch counts fewer targets
            batches.append((x, y))
        steps.append(batches)
    for name, lrs, clip in (("accumulate", [0.05] * 4, 0.5), ("schedule", [0.01, 0.05, 0.03, 0.002], 0.0)):
        def make():
            model = TinyLM(V, dim)
            model.load_state_dict(init)
            return model, torch.optim.AdamW(model.parameters(), lr=1.0, betas=(0.9, 0.95), weight_decay=0.1)

        model, opt = make()
        original = loop_module.cross_entropy, loop_module.clip_grad_norm
        loop_module.cross_entropy, loop_module.clip_grad_norm = torch_loss, torch.nn.utils.clip_grad_norm_
        try:
            losses = loop_module.train(model, steps, opt, lambda s: lrs[s], clip)
        finally:
            loop_module.cross_entropy, loop_module.clip_grad_norm = original
        expected = (torch.tensor(losses, dtype=torch.float64), *[p.detach().clone() for p in model.parameters()])
        reference = loop_reference(make, steps, lrs, clip)
        assert all(torch.allclose(a.double(), b.double(), atol=1e-6) for a, b in zip(expected, reference))
        inputs = {f"step{s}.{b}.{xy}": t for s, batches in enumerate(steps) for b, pair in enumerate(batches)
                  for xy, t in zip("xy", pair)}
        inputs |= {f"init.{k}": v for k, v in init.items()}
        c = w.case(f"loop.{name}", inputs, expected, params={"lrs": lrs, "grad_clip": clip, "vocab_size": V,
                                                               "dim": dim, "steps": len(steps), "micro_batches": 2},
                   tol={"atol": 1e-5, "rtol": 1e-4},
                   hint="per step: set every group's lr to lr_at(step); per micro-batch the loss times its share of "
                        "the step's counted targets, backward; clip (if grad_clip > 0); optimizer.step(); zero the "
                        "gradients; the step's loss is the sum of the weighted losses")
        c.mistake("no_zero_grad", loop_reference(make, steps, lrs, clip, zero_grad="never"),
                  "the gradients are never zeroed: backward ADDS to .grad, so each step also applies every earlier "
                  "step's gradient; zero them after optimizer.step()")
        c.mistake("zero_before_step", loop_reference(make, steps, lrs, clip, zero_grad="before_step"),
                  "the gradients are zeroed before optimizer.step(), which then has nothing to apply")
        c.mistake("mean_of_means", loop_reference(make, steps, lrs, clip, weighting="mean"),
                  "each micro-batch's mean loss is weighted 1 / (number of micro-batches): weight it by its share "
                  "of the step's counted targets, so the step's loss is the mean over all of them")
        c.mistake("not_weighted", loop_reference(make, steps, lrs, clip, weighting="none"),
                  "the micro-batch losses are not weighted: their sum counts the step's targets more than once; "
                  "weight each by its share of the step's counted targets")
        c.mistake("last_micro_batch", loop_reference(make, steps, lrs, clip, record="last"),
                  "the step's loss reported is the last micro-batch's only: add every micro-batch's weighted loss")
        if clip:
            c.mistake("no_clip", loop_reference(make, steps, lrs, clip, clip_when="never"),
                      "the gradient is not clipped (or clipped after optimizer.step(), which is too late): clip "
                      "between the last backward and the step")
        else:
            c.mistake("lr_off_by_one", loop_reference(make, steps, lrs, clip, lr_shift=1),
                      "learning rate off by one: step s (from 0) uses lr_at(s)")
            c.mistake("lr_not_set", loop_reference(make, steps, [1.0] * 4, clip),
                      "the learning rate is never set: every step sets each parameter group's \"lr\" to lr_at(step)")


def lab11(w) -> None:
    ce_cases(w)
    adamw_cases(w)
    clip_cases(w)
    loop_cases(w)
