"""The robust fine-tuning options as the loop meets them (docs/robust.md says when each helps):

    --l2sp λ          make_l2sp: after each backward, add 2λ(θ − θ₀) to the gradients (finetune/l2sp.py)
    --embed_noise α   NEFTune noise on the input embeddings in training mode (finetune/neftune.py)
    --perturb p       edited training prompts, made when the data is prepared (training/data.py)
    --dev_every N     DevSelection: exact match on held-out records every N steps, the best model kept
                      in OUT_DIR/best, the run stopped after --patience evaluations without improvement
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from ..cli import UsageError
from ..finetune.early_stopping import EarlyStopping
from ..finetune.exact_match import exact_match_accuracy
from ..finetune.l2sp import L2SP
from ..model import Llama
from ..peft.save_load import read_peft_weights
from .data import DEV_ANSWER_TOKENS, Data, dev_split
from .config import TrainConfig
from .distributed import load_weights, unsharded
from .progress import Progress
from .runtime import Runtime, exact_float32
from .state import save_model, saved_tensors


def make_l2sp(model: Llama, cfg: TrainConfig) -> L2SP | None:
    """--l2sp: the penalty over the tensors choose_trainable left trainable (None when off), anchored at
    their values now: the --init_from base, before any step (a resumed run copies its own weights in
    only afterwards). θ₀ stays float32 on the training device, deliberately: the differences θ − θ₀ it
    pulls on are small, and bfloat16 anchors would round them away; on the CPU it would cost a copy to
    the GPU at every step. Under --fsdp it is made after sharding, so θ₀ is sharded like the weights."""
    if not cfg.l2sp:
        return None
    try:
        return L2SP(model, cfg.l2sp)
    except ValueError as e:
        raise UsageError(f"--l2sp: {e}") from None


class DevSelection:
    """Low-cost validation (--dev_every): score the dev records every N steps, keep the best model, stop
    when it stops improving. With --dev_every 0 it is off: never due, never stopping."""

    def __init__(self, cfg: TrainConfig, rt: Runtime, data: Data, model: Llama, progress: Progress):
        self.cfg, self.rt, self.data, self.model, self.progress = cfg, rt, data, model, progress
        self.best_dir = Path(cfg.out_dir) / "best"
        self.stopper = EarlyStopping(cfg.patience or None, cfg.min_delta, mode="max") if cfg.dev_every else None
        self.records = dev_split(data, cfg, model.config.max_seq_len) if cfg.dev_every else []
        if self.stopper is not None:
            rt.say(f"dev: exact match on {len(self.records)} held-out records every {cfg.dev_every} steps, best model "
                   f"kept in {self.best_dir}" +
                   (f"; stops after {cfg.patience} evaluations without improvement" if cfg.patience else ""))

    @property
    def should_stop(self) -> bool:
        return self.stopper is not None and self.stopper.should_stop

    def state_dict(self) -> dict | None:
        return None if self.stopper is None else self.stopper.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        """The progress of a resumed run; the flags (patience, min_delta) are this run's."""
        if self.stopper is not None and state:
            self.stopper = EarlyStopping.from_state_dict({**state, "patience": self.stopper.patience,
                                                          "min_delta": self.stopper.min_delta})

    def maybe_evaluate(self, step: int) -> None:
        """At every --dev_every steps and at the end: score, keep the best, count toward stopping. Rank 0
        alone generates and saves; it broadcasts the score, so every rank's EarlyStopping takes the same
        decisions and all stop together."""
        if self.stopper is None or step % self.cfg.dev_every and step != self.cfg.max_steps:
            return
        with self.progress.periodic_work("dev", self.cfg.dev_every):
            accuracy = torch.zeros((), dtype=torch.float64, device=self.rt.device)
            with unsharded(self.model):  # --fsdp: every process holds the whole model while rank 0 scores it
                if self.rt.master:  # greedy, in the run's precision; float32 without TF32, as experiments/ runs
                    with torch.no_grad(), self.rt.autocast(), exact_float32():
                        accuracy.fill_(exact_match_accuracy(self.model, self.data.tokenizer, self.records,
                                                            DEV_ANSWER_TOKENS, image_features=self.data.image_features))
            if self.rt.world_size > 1:
                dist.broadcast(accuracy, src=0)
            accuracy = accuracy.item()
            improved = self.stopper.update(step, accuracy)
            if improved:
                self.save_best()
        waited = f", {self.stopper.evals_since_best}/{self.cfg.patience} without improvement" if self.cfg.patience else ""
        self.rt.say(f"step {step}: dev exact match ({self.rt.precision}) {accuracy:.4f} on {len(self.records)} records" +
                    (f", new best: saved to {self.best_dir}" if improved else
                     f"; best {self.stopper.best_metric:.4f} at step {self.stopper.best_step}{waited}"))
        self.progress.record(step=step, dev_accuracy=accuracy)

    def save_best(self) -> None:
        """The model as it is now into OUT_DIR/best, for use (rank 0 writes; under --fsdp every process
        joins in gathering the tensors it saves: the whole model, or a PEFT method's adapter)."""
        tensors = saved_tensors(self.model, self.cfg)
        if self.rt.master:
            save_model(self.best_dir, self.model, self.data.tokenizer, self.data.is_instructions, self.cfg.adapter_base,
                       tensors)

    def finish(self) -> dict | None:
        """For a finished run: what was chosen and what it saved, said and written to
        OUT_DIR/early_stopping.json."""
        if self.stopper is None or self.stopper.last_step is None:
            return None
        early = {**self.stopper.summary(self.cfg.max_steps), "best_checkpoint": str(self.best_dir)}
        self.rt.say(f"early stopping: chose step {early['chosen_step']} (dev exact match {early['best_metric']:.4f}, "
                    f"{self.best_dir}); stopped at step {early['stopped_at']} of {self.cfg.max_steps}, "
                    f"{100 * early['compute_saved']:.0f}% of the planned steps saved")
        if self.rt.master:
            tmp = Path(self.cfg.out_dir) / "early_stopping.tmp.json"
            tmp.write_text(json.dumps(early, indent=2) + "\n")
            tmp.replace(Path(self.cfg.out_dir) / "early_stopping.json")
        return early

    def load_best(self) -> None:
        """Put the best dev model's adapter back into the model, sharded or not: the run's chosen result
        (for --merge)."""
        if self.stopper is not None and self.stopper.best_step is not None:
            load_weights(self.model, read_peft_weights(self.model, self.best_dir))
