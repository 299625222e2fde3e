"""Trial versus baseline, plain-language verdicts and noise-aware selection rules, from stored counts.

Built on the per-class bootstrap of :mod:`selmix_ray.uncertainty` (the resampling, the interval types and
their measured coverage are described there). numpy only.

Decisions (not settled elsewhere)
    - Trial versus baseline. Stored counts cannot pair images (which image each model got right is not
      stored), so :func:`compare` resamples the two independently: the "unpaired" bootstrap. It is
      conservative (too wide) when the two models err on the same images, which they do when one is the
      other plus a post-hoc correction. :func:`compare_paired` takes per-image predictions of both models on
      the same validation images and resamples the images once for both ("paired"), the right computation
      once the engine stores predictions. It matters: for a trial that re-decides 10% of a baseline's
      images (90% of those rightly; true gain +0.035 min recall, +0.015 mean recall; K = 10, 50 images per
      class) the 90% interval of the difference is 0.265 wide unpaired and 0.098 paired (min recall),
      0.084 and 0.024 (mean recall); the unpaired verdict never says "better", the paired one in 27% and
      70% of draws (``bench_uncertainty.py``). P(better) is the fraction of replicates where the trial's value
      exceeds the baseline's (ties count half; reflected like the interval under the basic method): a
      bootstrap probability, not a posterior.
    - Verdict: "better" or "worse" when the ``level`` interval of the difference (trial - baseline) excludes
      0, else "indistinguishable". Default level 0.90. Measured (K = 10, unpaired, independent validation
      draws): for two equally good classifiers it says better or worse in 0.03-0.14 of draws (nominal 0.10);
      when the trial's every recall is 0.05 higher it says better in 0.20-0.21 of draws for min recall,
      0.47-0.65 for H-mean and mean recall at 50 images per class (0.12-0.38 at 20): at these sizes an
      "indistinguishable" verdict is the common outcome for a real but small gain.
    - Selection rules (:data:`SELECTION_RULES`): ``"max"`` the highest point value (today's rule) and
      ``"lcb"`` the highest lower end of the ``level`` percentile interval, which prefers a trial whose value
      is both high and stable under resampling (the winner of ``max`` among many noisy trials is partly the
      luckiest). Measured on 60 synthetic candidates (K = 10, true min recall best 0.827, median 0.693):
      the pick's true min recall is 0.779 (lcb) vs 0.773 (max) at 50 validation images per class and
      0.754 vs 0.754 at 20: a small gain at best, far from closing the 0.05-0.07 gap to the best
      candidate. A third rule, the bias-corrected point value 2 v - mean(V*), was measured too (0.772 and
      0.745, worse than max) and left out.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, DataError
from .metrics import confusion_counts
from .objectives import Objective
from .uncertainty import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    METHODS,
    _bounds,
    _check_counts,
    _check_objective,
    _choice_problem,
    _level_problem,
    _needs_columns,
    _raise,
    _resolve_method,
    _streams,
    _vectorised,
    bootstrap,
    replicate_values,
    resample_paired,
)

__all__ = ["SELECTION_RULES", "Comparison", "Verdict", "compare", "compare_paired", "verdict", "select",
           "selection_scores"]

SELECTION_RULES = ("max", "lcb")
TIE_TOLERANCE = 1e-9  # |trial - baseline| at or below this is a tie in P(better)


# ---------------------------------------------------------------------------------------------------
# Trial versus baseline


@dataclass(frozen=True)
class Comparison:
    """A trial against a baseline on one split under one objective.

    Attributes:
        trial, baseline: the two point values.
        difference: trial - baseline (point).
        low, high: the ``level`` interval of the difference.
        prob_better: the fraction of replicates where the trial's value exceeds the baseline's (ties half);
            with the basic method, of the replicated differences reflected about the point difference, so
            that a lower end above 0 at level 0.9 always comes with P(better) >= 0.95.
        level, method, resamples: as :class:`Interval`.
        paired: True when the same resampled images scored both (per-image predictions), False when the two
            were resampled independently from counts (conservative when their errors are correlated).
    """

    trial: float
    baseline: float
    difference: float
    low: float
    high: float
    prob_better: float
    level: float
    method: str
    resamples: int
    paired: bool

    @classmethod
    def from_draws(cls, trial: float, baseline: float, trial_draws, baseline_draws, *,
                   level: float = DEFAULT_LEVEL, method: str = "percentile", paired: bool = False) -> Comparison:
        """Build from the two point values and their (B,) bootstrap replicates (paired: same resampled images)."""
        _raise([_level_problem(level), _choice_problem("method", method, METHODS[1:])], "comparison")
        trial_draws = np.asarray(trial_draws, dtype=np.float64)
        baseline_draws = np.asarray(baseline_draws, dtype=np.float64)
        if trial_draws.ndim != 1 or trial_draws.shape != baseline_draws.shape:
            raise DataError(
                f"trial_draws and baseline_draws must be (B,) of the same length, but got shapes "
                f"{trial_draws.shape} and {baseline_draws.shape}."
            )
        draws = trial_draws - baseline_draws
        difference = float(trial) - float(baseline)
        low, high = _bounds(difference, draws, level, method)
        if method == "basic":  # the distribution the basic interval reads: draws reflected about the point
            draws = 2.0 * difference - draws
        # ties within rounding count as ties: recall objectives step by whole images, and a reflected draw
        # 2 d - d* that is 0 in exact arithmetic may come out as +-1e-16
        tie = np.abs(draws) <= TIE_TOLERANCE
        prob = float(np.mean((draws > 0) & ~tie) + 0.5 * np.mean(tie))
        return cls(trial=float(trial), baseline=float(baseline), difference=difference, low=low, high=high,
                   prob_better=prob, level=float(level), method=method, resamples=int(draws.size),
                   paired=bool(paired))


def compare(
    trial_counts, baseline_counts, objective: Objective, *, level: float = DEFAULT_LEVEL,
    method: str = "auto", resamples: int = DEFAULT_RESAMPLES, seed=0, trial_repeats: int = 1,
    baseline_repeats: int = 1,
) -> Comparison:
    """Trial against baseline from confusion counts alone: the unpaired per-class bootstrap.

    The two are resampled independently (two streams derived from ``seed``), since counts do not say
    which images each got right; the interval is too wide (conservative) when their errors fall on the same
    images. Use :func:`compare_paired` when per-image predictions exist.

    Args:
        trial_counts, baseline_counts: (K, K) counts on the same split, rows = true class.
        objective: scores both.
        trial_repeats, baseline_repeats: copies summed into each (as ``repeats`` of :func:`resample`).
    """
    _check_objective(objective)
    trial_counts = _check_counts(trial_counts, "trial_counts")
    baseline_counts = _check_counts(baseline_counts, "baseline_counts")
    if trial_counts.shape != baseline_counts.shape:
        raise DataError(
            f"trial_counts and baseline_counts must have the same shape (K, K), but got "
            f"{trial_counts.shape} and {baseline_counts.shape}."
        )
    trial_rng, baseline_rng = _streams(seed, ["trial", "baseline"])
    trial_draws = bootstrap(trial_counts, objective, resamples=resamples, seed=trial_rng, repeats=trial_repeats)
    baseline_draws = bootstrap(baseline_counts, objective, resamples=resamples, seed=baseline_rng,
                               repeats=baseline_repeats)
    return Comparison.from_draws(objective.value(trial_counts), objective.value(baseline_counts), trial_draws,
                                 baseline_draws, level=level, method=_resolve_method(method, objective),
                                 paired=False)


def compare_paired(
    labels, trial_predictions, baseline_predictions, objective: Objective, *, n_classes: int,
    level: float = DEFAULT_LEVEL, method: str = "auto", resamples: int = DEFAULT_RESAMPLES, seed=0,
) -> Comparison:
    """Trial against baseline on the same images: the paired per-class bootstrap.

    Args:
        labels: (n,) true classes of the validation images.
        trial_predictions, baseline_predictions: (n,) predictions of each model on those images.
        n_classes: K.
    """
    _check_objective(objective)
    replicates = resample_paired(
        labels, {"trial": trial_predictions, "baseline": baseline_predictions}, n_classes=n_classes,
        resamples=resamples, seed=seed, columns=_needs_columns(objective), full=not _vectorised(objective),
    )
    points = [objective.value(confusion_counts(labels, predictions, n_classes))
              for predictions in (trial_predictions, baseline_predictions)]
    return Comparison.from_draws(*points, replicate_values(objective, replicates["trial"]),
                                 replicate_values(objective, replicates["baseline"]), level=level,
                                 method=_resolve_method(method, objective), paired=True)


@dataclass(frozen=True)
class Verdict:
    """A plain-language verdict on a trial against a baseline.

    Attributes:
        kind: "better", "worse" (the ``level`` interval of the difference excludes 0) or "indistinguishable".
        comparison: the numbers behind it.
        trial, baseline: their names as shown to a user.
        objective: the objective's name.
        split: the split the counts came from ("validation", "test").
    """

    kind: str
    comparison: Comparison
    trial: str
    baseline: str
    objective: str
    split: str

    def __str__(self) -> str:
        c = self.comparison
        phrase = {
            "better": "is better than",
            "worse": "is worse than",
            "indistinguishable": "is indistinguishable from",
        }[self.kind]
        noise = "beyond noise" if self.kind != "indistinguishable" else "within noise"
        pairing = "paired" if c.paired else "unpaired"
        return (
            f"{self.trial} {phrase} {self.baseline} {noise}: {self.objective} {c.trial:.2f} vs {c.baseline:.2f}, "
            f"difference {c.difference:+.2f} [{c.level:.0%}: {c.low:+.2f}, {c.high:+.2f}], "
            f"P(better) = {c.prob_better:.2f} ({self.split}, {c.resamples} {pairing} resamples)"
        )


def verdict(
    comparison: Comparison, *, trial: str = "the best trial", baseline: str = "the best baseline",
    objective: str = "objective", split: str = "validation",
) -> Verdict:
    """Classify a :class:`Comparison`: better / worse when its interval excludes 0, else indistinguishable."""
    if not isinstance(comparison, Comparison):
        raise ConfigError(f"comparison must be a Comparison (compare(...)), but got {comparison!r}.")
    if comparison.low > 0:
        kind = "better"
    elif comparison.high < 0:
        kind = "worse"
    else:
        kind = "indistinguishable"
    return Verdict(kind=kind, comparison=comparison, trial=str(trial), baseline=str(baseline),
                   objective=str(objective), split=str(split))


# ---------------------------------------------------------------------------------------------------
# Selection rules


def selection_scores(
    candidates: Mapping[Hashable, np.ndarray], objective: Objective, *, rule: str = "max",
    level: float = DEFAULT_LEVEL, method: str = "percentile", resamples: int = DEFAULT_RESAMPLES, seed=0,
    repeats: int = 1,
) -> dict[Hashable, float]:
    """The score each rule ranks candidates by (higher is better).

    Args:
        candidates: id -> (K, K) validation counts at the candidate's selected report.
        rule: "max" (point value) or "lcb" (the lower end of the two-sided ``level`` interval of
            ``method``, as :func:`interval`: a one-sided (1 + level) / 2 lower bound).
        method: the interval behind "lcb". "percentile" by default even for min recall: the basic lower end
            of a minimum, v - (q_high - v), sees only the replicates' upward spread, which a minimum hardly
            has, so it would not penalise a noisy trial.
        seed: each candidate is resampled from its own stream, derived from ``seed`` and its id.
        repeats: copies summed into each candidate's counts.
    """
    _check_objective(objective)
    _raise([_choice_problem("rule", rule, SELECTION_RULES), _level_problem(level),
            _choice_problem("method", method, METHODS)], "selection rule")
    method = _resolve_method(method, objective)
    if not candidates:
        raise DataError("candidates is empty: give id -> (K, K) validation counts of at least one trial.")
    scores = {}
    streams = _streams(seed, list(candidates))
    for stream, (key, counts) in zip(streams, candidates.items()):
        point = float(objective.value(_check_counts(counts, f"candidate {key!r}")))
        if rule == "max":
            scores[key] = point
            continue
        draws = bootstrap(counts, objective, resamples=resamples, seed=stream, repeats=repeats)
        scores[key] = _bounds(point, draws, level, method)[0]
    return scores


def select(
    candidates: Mapping[Hashable, np.ndarray], objective: Objective, *, rule: str = "max",
    level: float = DEFAULT_LEVEL, method: str = "percentile", resamples: int = DEFAULT_RESAMPLES, seed=0,
    repeats: int = 1,
) -> Hashable:
    """The id of the candidate ``rule`` selects (ties: the first in iteration order); see
    :func:`selection_scores` for the arguments."""
    scores = selection_scores(candidates, objective, rule=rule, level=level, method=method,
                              resamples=resamples, seed=seed, repeats=repeats)
    return max(scores, key=scores.__getitem__)

