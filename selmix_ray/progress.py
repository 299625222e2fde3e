"""Driver progress: one concise line per finished, failed or retried trial (instead of Tune's tables)."""

from __future__ import annotations

import math
import sys

from ray.tune import Callback

from .constants import MAX_FAILURES, STEP_KEY

__all__ = ["ProgressCallback", "log"]


class ProgressCallback(Callback):
    """One line on the driver per finished, failed or retried trial (instead of Tune's tables)."""

    def __init__(self, *, num_samples: int, steps: int, metric: str):
        self.num_samples = num_samples
        self.steps = steps
        self.metric = metric
        self.finished = 0
        self.best = -math.inf

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.finished += 1
        result = trial.last_result or {}
        score = result.get(self.metric, math.nan)
        if math.isfinite(score):
            self.best = max(self.best, score)
        step = int(result.get(STEP_KEY, 0))
        how = "complete" if step >= self.steps else f"pruned at step {step}"
        log(f"trial {self.finished}/{self.num_samples} {trial.trial_id} {how}: {self.metric}={score:.4f} "
             f"(best {self.best:.4f})")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.finished += 1
        log(f"trial {trial.trial_id} failed for good after {MAX_FAILURES} retries; see {trial.path}")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        log(f"trial {trial.trial_id} raised; retrying it from its last checkpoint")


def log(message: str) -> None:
    """Driver progress: one concise line (not Tune's tables)."""
    print(f"[selmix-ray] {message}", file=sys.stdout, flush=True)
