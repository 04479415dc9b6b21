"""Lab 6, the training loop: the mistakes students make in ``windows``, ``get_lr`` and ``decays``, and the
inputs that show them."""

import numpy as np
import torch

from llama_min.training.config import TrainConfig

from ..mutations import m
from . import Case, generator

WINDOWS, GET_LR, DECAYS = ("llama_min/training/data.py::windows", "llama_min/training/optim.py::get_lr",
                           "llama_min/training/optim.py::decays")
NEXT = "the target at position t is the NEXT token, tokens[s + t + 1]"
ONLY_2D = "decay exactly the 2-D weight matrices (p.dim() == 2): not norm gains, biases or the adapter gate"

MUTATIONS = [
    m("loss_not_shifted", 6, WINDOWS, "loss not shifted by one",
      ("return rows[:, :-1], rows[:, 1:]", "return rows[:, :-1], rows[:, :-1]"), why=NEXT),
    m("windows_shifted_back", 6, WINDOWS, "targets shifted the wrong way",
      ("return rows[:, :-1], rows[:, 1:]", "return rows[:, 1:], rows[:, :-1]"), why=NEXT),
    m("windows_keep_uint16", 6, WINDOWS, "Return int64 arrays", (".astype(np.int64)", ""),
      why="the token files hold uint16; the embedding and the loss take int64"),
    m("windows_one_short", 6, WINDOWS, "windows of seq_len + 1 tokens",
      ("tokens[s:s + seq_len + 1]", "tokens[s:s + seq_len]"),
      why="inputs and targets are seq_len long each, so each window holds seq_len + 1 tokens"),
    m("warmup_off_by_one", 6, GET_LR, "warm-up off by one",
      ("(step + 1) / cfg.warmup_steps", "step / cfg.warmup_steps"),
      why="step 0 must already train, at lr·1/warmup_steps (lr·(step+1)/warmup_steps), reaching the peak at the "
          "last warm-up step"),
    m("cosine_to_zero", 6, GET_LR, "the cosine decays to 0", ("min_lr = cfg.lr * cfg.min_lr_ratio", "min_lr = 0.0"),
      why="it ends at lr·min_lr_ratio (LLaMA: 10% of the peak)"),
    m("cosine_from_step_zero", 6, GET_LR, "the cosine starts at step 0",
      ("progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)",
       "progress = step / max(1, decay_steps)"),
      why="its progress is (step − warmup_steps) / (decay_steps − warmup_steps)"),
    m("decay_steps_ignored", 6, GET_LR, "decay_steps is ignored",
      ("decay_steps = cfg.decay_steps or cfg.max_steps", "decay_steps = cfg.max_steps"),
      why="the cosine ends at decay_steps (at max_steps only when it is 0)"),
    m("cosine_no_floor", 6, GET_LR, "the cosine goes on after decay_steps",
      ("if step >= decay_steps:", "if False:"), why="from there the rate stays at lr·min_lr_ratio"),
    m("cosine_full_period", 6, GET_LR, "a full cosine period",
      ("math.cos(math.pi * progress)", "math.cos(2 * math.pi * progress)"),
      why="half a period takes the rate from the peak down to the floor: cos(π·progress)"),
    m("linear_decay", 6, GET_LR, "linear decay instead of cosine",
      ("0.5 * (1.0 + math.cos(math.pi * progress))", "(1.0 - progress)"),
      why="LLaMA uses a cosine schedule: min_lr + ½(1 + cos(π·progress))·(lr − min_lr)"),
    m("floor_not_added", 6, GET_LR, "the floor is not added back",
      ("return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)",
       "return 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)"),
      why="the cosine runs from lr down to min_lr: min_lr + ½(1 + cos)·(lr − min_lr)"),
    m("gate_decayed", 6, DECAYS, "the adapter gate (1, H, 1, 1) is decayed", ("p.dim() == 2", "p.dim() >= 2"),
      why="it is 4-D only to broadcast, one scalar per head, not a matrix; " + ONLY_2D),
    m("decays_everything", 6, DECAYS, "every tensor is decayed", ("p.dim() == 2", "True"), why=ONLY_2D),
    m("decays_nothing", 6, DECAYS, "no tensor is decayed", ("p.dim() == 2", "False"), why=ONLY_2D),
    m("decays_inverted", 6, DECAYS, "the vectors are decayed instead of the matrices", ("p.dim() == 2", "p.dim() < 2"),
      why=ONLY_2D),
]


def lr_case(name: str, cfg: TrainConfig) -> Case:
    fields = {"lr": cfg.lr, "warmup_steps": cfg.warmup_steps, "max_steps": cfg.max_steps,
              "decay_steps": cfg.decay_steps, "min_lr_ratio": cfg.min_lr_ratio}
    return Case(f"get_lr.{name}", {},
                lambda code, t: torch.tensor([float(code.get_lr(s, cfg)) for s in range(cfg.max_steps + 3)],
                                             dtype=torch.float64),
                params={"config": fields}, tol={"atol": 1e-9, "rtol": 1e-6},
                hint="warm-up lr·(step+1)/warmup_steps; cosine from lr to lr·min_lr_ratio between warmup_steps "
                     "and decay_steps (or max_steps); lr·min_lr_ratio after")


def windows_run(code, t):
    x, y = code.windows(t["tokens"].numpy().astype(np.uint16), t["starts"].numpy(), 8)
    return torch.as_tensor(np.asarray(x)), torch.as_tensor(np.asarray(y))


SHAPES = {"tok_embeddings.weight (vocab, dim)": [50, 16], "layers.0.attention.wq.weight (dim, dim)": [16, 16],
          "norm.weight (dim,)": [16], "lora_a (r, in)": [4, 16], "lora_b (out, r)": [16, 4],
          "adapter gate (1, H, 1, 1)": [1, 4, 1, 1], "bottleneck bias (b,)": [8]}


def cases():
    g = generator(6)
    tokens = torch.randint(0, 1000, (60,), generator=g)  # the token files hold uint16; the grader casts
    yield Case("windows", {"tokens": tokens, "starts": torch.tensor([0, 7, 30, 51])}, windows_run,
               params={"seq_len": 8}, hint="inputs tokens[s : s+seq_len], targets tokens[s+1 : s+seq_len+1]",
               dtype_cause="Return int64 arrays: the token files hold uint16, the embedding and the loss take int64.",
               shape_causes={str([4, 9]): "windows of seq_len + 1 tokens: inputs and targets are seq_len long each "
                             "(drop the last token from the inputs, the first from the targets)"})
    yield lr_case("warmup", TrainConfig(lr=1e-3, warmup_steps=5, max_steps=30, min_lr_ratio=0.1))
    yield lr_case("decay_steps", TrainConfig(lr=2e-3, warmup_steps=3, max_steps=30, decay_steps=20, min_lr_ratio=0.2))
    yield Case("decays", {}, lambda code, t: torch.tensor([bool(code.decays(torch.empty(s))) for s in SHAPES.values()]),
               params={"shapes": SHAPES}, hint="weight decay on the 2-D weight matrices only")
