"""Low-cost validation: keep the best checkpoint by a dev metric, stop when it stops improving.

The trainer evaluates a small dev split every N steps (exact-match accuracy for instruction data)
and calls ``update(step, metric)``:

    improved  = metric > best + min_delta        (mode "max"; "min" mirrors it for losses)
    if improved: best, best_step = metric, step  -> the caller saves this checkpoint ("keep best")
    else:        evals_since_best += 1
    stop when evals_since_best >= patience       (patience counts evaluations, not steps)

A tie is not an improvement, so of equal scores the earliest (cheapest) checkpoint is kept. A NaN
metric never improves. ``summary(total_steps)`` reports the step whose checkpoint was chosen, the step
at which training stopped, and the compute saved: the fraction of the planned steps never run,
(total_steps − stopped_at) / total_steps (zero when the run went to the end). ``state_dict`` and
``from_state_dict`` carry the state across a resumed run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class EarlyStopping:
    patience: int | None = None  # evaluations without improvement before stopping; None: never stop
    min_delta: float = 0.0  # an improvement must beat the best by more than this
    mode: str = "max"  # "max" for accuracy, "min" for a loss
    best_metric: float | None = field(default=None, init=False)
    best_step: int | None = field(default=None, init=False)
    last_step: int | None = field(default=None, init=False)
    evals_since_best: int = field(default=0, init=False)

    def __post_init__(self):
        if self.mode not in ("max", "min"):
            raise ValueError(f"early stopping mode must be 'max' (accuracy) or 'min' (loss), got {self.mode!r}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 evaluation (or None to never stop), got {self.patience}")
        if self.min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {self.min_delta}")

    def _improves(self, metric: float) -> bool:
        if self.best_metric is None:
            return metric == metric  # the first evaluation is the best so far, unless it is NaN
        if self.mode == "max":
            return metric > self.best_metric + self.min_delta
        return metric < self.best_metric - self.min_delta

    def update(self, step: int, metric: float) -> bool:
        """Record the dev metric measured after ``step`` optimiser steps. Returns True when it is a
        new best: save the checkpoint now."""
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"evaluation steps must increase: got step {step} after step {self.last_step}")
        self.last_step = step
        if self._improves(metric):
            self.best_metric, self.best_step, self.evals_since_best = metric, step, 0
            return True
        self.evals_since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.evals_since_best >= self.patience

    def state_dict(self) -> dict:
        """Everything needed to resume (JSON-serialisable): store it with the training state."""
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> "EarlyStopping":
        settings = {f.name: state[f.name] for f in fields(cls) if f.init}
        stopper = cls(**settings)
        for f in fields(cls):
            if not f.init:
                setattr(stopper, f.name, state[f.name])
        return stopper

    def summary(self, total_steps: int) -> dict:
        """What was chosen and what it saved, for the run log and early_stopping.json."""
        if self.last_step is None:
            raise ValueError("no evaluation was recorded: call update(step, metric) at least once")
        stopped_at = self.last_step if self.should_stop else total_steps
        return {
            "chosen_step": self.best_step,
            "best_metric": self.best_metric,
            "stopped_at": stopped_at,
            "total_steps": total_steps,
            "steps_saved": total_steps - stopped_at,
            "compute_saved": (total_steps - stopped_at) / total_steps,
        }
