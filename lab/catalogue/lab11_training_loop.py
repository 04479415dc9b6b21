"""Lab 11, the training loop from scratch: the mistakes students make in ``cross_entropy``, ``AdamW.step``,
``clip_grad_norm`` and ``train`` (llama_min/from_scratch/), and the inputs that show them.

The loop's cases train lab/graders/tiny_lm.py's TinyLM with torch's AdamW, and give the loop torch's
cross-entropy and clipping in place of the lab's, as the grader does, so that only the loop is graded there."""

import torch
import torch.nn.functional as F

from ..graders.tiny_lm import TinyLM
from ..mutations import m
from . import Case, generator

CE, ADAMW = "llama_min/from_scratch/cross_entropy.py::cross_entropy", "llama_min/from_scratch/adamw.py::AdamW.step"
CLIP, LOOP = "llama_min/from_scratch/clip.py::clip_grad_norm", "llama_min/from_scratch/loop.py::train"
IGNORE = -100
COUNTED = "divide by the number of targets that are not ignore_index"
DECAY = "AdamW decays θ itself, θ ← θ − lr·λ·θ, before the adaptive step (torch.optim.AdamW)"
SHARE = "weight each micro-batch's mean loss by its share of the step's counted targets"

MUTATIONS = [
    m("ce_no_max", 11, CE, "exp overflows", ("m = z.max(dim=-1, keepdim=True).values", "m = torch.zeros_like(z[:, :1])"),
      why="subtract each row's maximum before exp: logsumexp(z) = m + log Σ exp(z − m)"),
    m("ce_summed", 11, CE, "the loss is summed", (" / counted.sum()", ""), why="it is the MEAN over the counted positions"),
    m("ce_mean_over_all", 11, CE, "the mean counts the ignored positions", ("/ counted.sum()", "/ len(targets)"),
      why=COUNTED),
    m("ce_in_bf16", 11, CE, "computed in bfloat16", ("z = logits.float()", "z = logits"),
      why="cast the logits to float32 first: the sum of exponentials needs it, and the loss is float32"),
    m("ce_ignored_looked_up", 11, CE, "must not be looked up", ("torch.where(counted, targets, 0)", "targets"),
      why="the targets equal to ignore_index are not token ids"),
    m("ce_detached", 11, CE, "carries no gradient", ("z = logits.float()", "z = logits.float().detach()"),
      why="build the loss from tensor operations on the logits"),
    m("ce_sign", 11, CE, "the sign is wrong", ("(logsumexp - picked)", "(picked - logsumexp)"),
      why="the loss is −log p(y) = logsumexp(z) − z[y], positive"),
    m("adamw_l2", 11, ADAMW, "weight decay added to the gradient", ("p.mul_(1 - lr * decay)", "g = g + decay * p"),
      why="that is L2 regularisation, Adam's original form, divided by √v̂ like the rest; " + DECAY),
    m("adamw_decay_without_lr", 11, ADAMW, "the decay is not multiplied by the learning rate",
      ("p.mul_(1 - lr * decay)", "p.mul_(1 - decay)"), why="θ ← θ − lr·λ·θ: it follows the schedule"),
    m("adamw_no_bias_correction", 11, ADAMW, "no bias correction",
      ("m_hat = m / (1 - beta1 ** t)", "m_hat = m"), ("v_hat = v / (1 - beta2 ** t)", "v_hat = v"),
      why="m and v start at 0, so divide them by (1 − β1^t) and (1 − β2^t)"),
    m("adamw_eps_inside_sqrt", 11, ADAMW, "ε inside the square root", ("(v_hat.sqrt() + eps)", "(v_hat + eps).sqrt()"),
      why="the denominator is √v̂ + ε"),
    m("adamw_decay_after_step", 11, ADAMW, "the decay is applied after the Adam step",
      ("p.mul_(1 - lr * decay)", "pass"),
      ("p.sub_(lr * m_hat / (v_hat.sqrt() + eps))",
       "p.sub_(lr * m_hat / (v_hat.sqrt() + eps))\n                p.mul_(1 - lr * decay)"), why=DECAY),
    m("adamw_no_grad_not_skipped", 11, ADAMW, "must be skipped", ("if p.grad is None:\n                    continue", "pass"),
      why="a parameter whose .grad is None (frozen, or unused this step) stays untouched"),
    m("adamw_shared_step_count", 11, ADAMW, "one step counter for all parameters",
      ("state['step'] += 1", "self.t = getattr(self, 't', 0) + 1\n                state['step'] = self.t"),
      why="t counts each parameter's own steps (its state), 1 at its first step"),
    m("clip_per_tensor", 11, CLIP, "each tensor clipped by its own norm",
      ("g.mul_(factor.to(g.dtype))", "g.mul_((max_norm / (g.norm() + 1e-6)).clamp(max=1.0))"),
      why="the norm is global, over all gradients at once, and one factor scales them all"),
    m("clip_always", 11, CLIP, "scaled although their norm is below max_norm", (".clamp(max=1.0)", ""),
      why="the factor is min(1, max_norm / ‖g‖)"),
    m("clip_returns_norm_after", 11, CLIP, "the norm returned is the one after clipping",
      ("return total", "return total * factor"), why="return ‖g‖ before scaling"),
    m("clip_squared_norm", 11, CLIP, "the squared norm", (".sum().sqrt()", ".sum()"), why="‖g‖ = sqrt(Σ g²)"),
    m("loop_no_zero_grad", 11, LOOP, "the gradients are never zeroed",
      ("optimizer.zero_grad(set_to_none=True)", "pass"),
      why="backward ADDS to .grad, so each step would also apply every earlier step's gradient; zero them after "
          "optimizer.step()"),
    m("loop_zero_before_step", 11, LOOP, "zeroed before optimizer.step()",
      ("optimizer.step()\n        optimizer.zero_grad(set_to_none=True)",
       "optimizer.zero_grad(set_to_none=True)\n        optimizer.step()"), why="the step then has nothing to apply"),
    m("loop_mean_of_means", 11, LOOP, "each micro-batch weighted 1 / (number of micro-batches)",
      ("share = int((y != IGNORE_INDEX).sum()) / n_targets", "share = 1 / len(batches)"),
      why=SHARE + ", so the step's loss is the mean over all of them"),
    m("loop_not_weighted", 11, LOOP, "the micro-batch losses are not weighted", (" * share", ""),
      why="their sum counts the step's targets more than once; " + SHARE),
    m("loop_lr_off_by_one", 11, LOOP, "learning rate off by one", ("lr_at(step)", "lr_at(step + 1)"),
      why="step s (from 0) uses lr_at(s)"),
    m("loop_lr_not_set", 11, LOOP, "the learning rate is never set", ("group['lr'] = lr_at(step)", "pass"),
      why="every step sets each parameter group's 'lr' to lr_at(step)"),
    m("loop_no_clip", 11, LOOP, "the gradient is not clipped", ("clip_grad_norm(model.parameters(), grad_clip)", "pass"),
      why="clip between the last backward and optimizer.step() (clipping after the step is too late)"),
    m("loop_clip_after_step", 11, LOOP, "the gradient is not clipped",
      ("if grad_clip > 0:\n            clip_grad_norm(model.parameters(), grad_clip)\n        optimizer.step()",
       "optimizer.step()\n        if grad_clip > 0:\n            clip_grad_norm(model.parameters(), grad_clip)"),
      why="clip between the last backward and optimizer.step() (clipping after the step is too late)"),
    m("loop_last_micro_batch", 11, LOOP, "the last micro-batch's only",
      ("step_loss += loss.item()", "step_loss = loss.item()"), why="add every micro-batch's weighted loss"),
    m("loop_loss_tensors", 11, LOOP, "Python floats", ("step_loss += loss.item()", "step_loss += loss"),
      why="loss.item(): a tensor would keep each step's graph alive"),
]

ADAMW_SETTINGS = {"betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.5}


def adamw_run(code, t):
    """The weight and bias after each of the steps, flattened, one row per step."""
    weight, bias = torch.nn.Parameter(t["weight"].clone()), torch.nn.Parameter(t["bias"].clone())
    frozen = torch.nn.Parameter(torch.ones(3))  # in the weight's group, never given a gradient
    opt = code.AdamW([{"params": [weight, frozen], "weight_decay": ADAMW_SETTINGS["weight_decay"]},
                      {"params": [bias], "weight_decay": 0.0}], lr=float(t["lrs"][0]),
                     betas=tuple(ADAMW_SETTINGS["betas"]), eps=ADAMW_SETTINGS["eps"])
    rows = []
    for s, lr in enumerate(t["lrs"].tolist()):
        for group in opt.param_groups:
            group["lr"] = lr
        weight.grad, bias.grad = t["grad_weight"][s].clone(), t["grad_bias"][s].clone()
        opt.step()
        rows.append(torch.cat([weight.detach().flatten(), bias.detach().flatten()]))
    return torch.stack(rows)


def clip_run(code, t, max_norm):
    params = [torch.nn.Parameter(torch.zeros_like(t[f"grad.{i}"])) for i in range(2)]
    for i, p in enumerate(params):
        p.grad = t[f"grad.{i}"].clone()
    norm = code.clip_grad_norm(params, max_norm)
    return torch.as_tensor(norm, dtype=torch.float32), *[p.grad for p in params]


def torch_cross_entropy(logits, targets, ignore_index=IGNORE):
    """What the grader gives the loop in place of the lab's cross_entropy."""
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)


def loop_run(code, t, params):
    """Train TinyLM through ``code.train`` with torch's cross-entropy and clipping: (losses, parameters after)."""
    names = code.train.__globals__  # the loop module's own names: give it torch's pieces, as the grader does
    saved = names["cross_entropy"], names["clip_grad_norm"]
    names["cross_entropy"], names["clip_grad_norm"] = torch_cross_entropy, torch.nn.utils.clip_grad_norm_
    try:
        model = TinyLM(params["vocab_size"], params["dim"])
        model.load_state_dict({k: t[f"init.{k}"] for k in model.state_dict()})
        optimizer = torch.optim.AdamW(model.parameters(), lr=1.0, betas=(0.9, 0.95), weight_decay=0.1)
        steps = [[(t[f"step{s}.{b}.x"], t[f"step{s}.{b}.y"]) for b in range(params["micro_batches"])]
                 for s in range(params["steps"])]
        lrs = params["lrs"]
        with torch.enable_grad():
            losses = code.train(model, steps, optimizer, lambda s: lrs[min(max(s, 0), len(lrs) - 1)],
                                params["grad_clip"])
        return (torch.tensor([float(v) for v in losses], dtype=torch.float64),
                *[p.detach().clone() for p in model.parameters()])
    finally:
        names["cross_entropy"], names["clip_grad_norm"] = saved


def gradient_run(code, t):
    logits = t["logits"].clone().requires_grad_()
    with torch.enable_grad():
        loss = code.cross_entropy(logits, t["targets"])
        grad, = torch.autograd.grad(loss, logits)
    return grad


def cases():
    g = generator(11)
    N, V = 12, 10
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[1, 5, 6]] = IGNORE
    for name, scale, dtype in (("plain", 2.0, torch.float32), ("large", 200.0, torch.float32),
                               ("bfloat16", 3.0, torch.bfloat16)):
        yield Case(f"cross_entropy.{name}", {"logits": (torch.randn(N, V, generator=g) * scale).to(dtype),
                                             "targets": targets},
                   lambda code, t: code.cross_entropy(t["logits"], t["targets"]),
                   hint="mean over the counted positions of logsumexp(z) − z[y], logsumexp computed as m + log Σ "
                        "exp(z − m) with m the row maximum, in float32",
                   dtype_cause="Return a float32 loss: compute in float32 whatever the logits' dtype.")
    yield Case("cross_entropy.gradient", {"logits": torch.randn(N, V, generator=g) * 2, "targets": targets},
               gradient_run, hint="d loss / d z = (softmax(z) − onehot(y)) / n_counted on counted rows, 0 on ignored ones")

    steps = 4
    yield Case("adamw", {"weight": torch.randn(6, 4, generator=g), "bias": torch.randn(4, generator=g),
                         "grad_weight": torch.randn(steps, 6, 4, generator=g),
                         "grad_bias": torch.randn(steps, 4, generator=g) * 0.01,
                         "lrs": torch.tensor([0.1, 0.05, 0.02, 0.01])},
               adamw_run, params=ADAMW_SETTINGS, tol={"atol": 1e-6, "rtol": 1e-5},
               hint="per parameter: θ ← θ(1 − lr·λ); m, v running averages of g and g²; θ ← θ − lr·m̂/(√v̂ + ε) with "
                    "m̂ = m/(1 − β1^t), v̂ = v/(1 − β2^t), t its own step count from 1")

    grads = {"grad.0": torch.randn(5, 3, generator=g), "grad.1": torch.randn(3, generator=g) * 3}
    for name, max_norm in (("clips", 1.0), ("below", 100.0)):
        yield Case(f"clip.{name}", grads, lambda code, t, max_norm=max_norm: clip_run(code, t, max_norm),
                   params={"max_norm": max_norm},
                   hint="‖g‖ = sqrt(Σ over every tensor of Σ g²); if it exceeds max_norm scale every gradient by "
                        "max_norm / (‖g‖ + 1e-6); return ‖g‖ before clipping")

    V, dim = 12, 8
    torch.manual_seed(113)
    inputs = {f"init.{k}": v.clone() for k, v in TinyLM(V, dim).state_dict().items()}
    for s in range(steps):
        for b in range(2):
            y = torch.randint(0, V, (2, 5), generator=g)
            if b == 1:
                y[:, :3] = IGNORE  # the second micro-batch counts fewer targets
            inputs |= {f"step{s}.{b}.x": torch.randint(0, V, (2, 5), generator=g), f"step{s}.{b}.y": y}
    for name, lrs, clip in (("accumulate", [0.05] * 4, 0.5), ("schedule", [0.01, 0.05, 0.03, 0.002], 0.0)):
        params = {"lrs": lrs, "grad_clip": clip, "vocab_size": V, "dim": dim, "steps": steps, "micro_batches": 2}
        yield Case(f"loop.{name}", inputs, lambda code, t, params=params: loop_run(code, t, params), params=params,
                   tol={"atol": 1e-5, "rtol": 1e-4},
                   hint="per step: set every group's lr to lr_at(step); per micro-batch the loss times its share of "
                        "the step's counted targets, backward; clip (if grad_clip > 0); optimizer.step(); zero the "
                        "gradients; the step's loss is the sum of the weighted losses")
