"""Paired trial-versus-baseline comparisons from the per-image predictions a sweep stores.

The engine keeps, at each copy's best report, the predicted class of every validation and test image
(``History.best_val_predictions``/``best_test_predictions``, read back as ``TrialHistory.val_predictions``
(repeats, n)); ``baselines.json`` holds the same for every baseline (``"val_predictions"``) and, once, the
true classes (``"val_labels"``, ``"test_labels"``). All are in the FeatureSet's order of the split. This
module turns them into what :func:`selmix_ray.verdicts.compare_paired` computes: the trial and the baseline
scored on the same resampled images.

    comparison = paired_comparison(run, trial_id)           # vs the best baseline, on validation
    comparison = compare_predictions(labels, trial, base, objective, n_classes=K)   # arrays (r, n) / (n,)

numpy only; nothing is retrained.

Decisions (not settled elsewhere)
    - Repeats. With r copies of a trial (or of a baseline), the copies scored the same images; each side's
      value is the objective of its copies' confusions summed (as the baselines' stored counts are), and a
      replicate draws the images once and scores every copy of both sides on them. So repeats never
      narrow the interval by counting an image r times, and with one copy each side the result is
      :func:`~selmix_ray.verdicts.compare_paired`'s, bit for bit (same seed). The point value is therefore
      the pooled value, not ``val/best_objective`` (the mean over copies of each copy's value); the two are
      equal without repeats.
    - Alignment is checked, not assumed: before comparing, each copy's predictions must reproduce the
      confusion counts stored beside them (the trial's best report, the baseline's pooled counts). A
      mismatch (e.g. a ``baselines.json`` copied from an experiment on other features) raises
      :class:`~selmix_ray.errors.DataError` instead of pairing unrelated images.
    - The best baseline is the one with the highest validation score (``val/best_objective``), the first in
      file order on ties.

Measured (``benchmarks/bench_pairing.py``; this shared 2-core machine)
    - Size: +728 bytes of JSON per trial history at K = 10 on MNIST-LT (500 validation + 1,500 test images,
      which MNIST's source orders by class; a 5-report history is 13-26 kB). At K = 1000 with 20 validation
      images per class (20,000 images, uint16) +40.6 kB per split in random image order, +28.1 kB grouped
      by class, stored once per history: less than one report's sparse validation counts (133 kB).
    - Time: the predictions are the arg-max each report computes for its counts anyway; what is added is a
      copy at a new best and the encoding at each checkpoint: 0.04 ms for both splits at K = 10, 1.3-2.3 ms
      per split at K = 1000 / 20,000 images (decoding 0.4 ms), against 0.5 ms (no post-hoc) to 50-130 ms
      (class weights) for one report at K = 10. Metrics are unchanged bit for bit.
    - Verdicts (90%, B = 1000) on 5 real MNIST-LT sweeps (rho = 100, seeds 0-4, 16 trials of
      search_spaces/min_recall.yaml with 1,000 steps, FIFO; the best baseline was post-hoc on the starting
      head every time: class weights 3x, logit adjustment 2x): trials called "better" than the best baseline
      on validation min recall unpaired 8 / 80, paired 13 / 80; on test min recall 0 / 80 either way; on test
      mean recall 2 / 80 unpaired, 18 / 80 paired. Pairing is more decisive both ways ("worse" on test mean
      recall 14 -> 38 / 80). Mean width of the interval of the difference, unpaired -> paired: validation
      min recall 0.224 -> 0.160, mean recall 0.066 -> 0.034; test 0.141 -> 0.103 and 0.039 -> 0.020.
      Against the starting head (large real gains) both call nearly every trial better (validation mean
      recall 66 -> 76 / 80). A validation verdict is on the trial's selected (best of ~20) report, whose value
      is biased upwards; the test verdicts are the unbiased ones.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from .baselines import baseline_predictions, baseline_row, stored_labels
from .constants import BASELINES_FILE, SCORE_KEY
from .errors import DataError, ExperimentError
from .history import dense_counts
from .metrics import confusion_counts
from .objectives import Objective, get_objective
from .uncertainty import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    Replicates,
    _check_objective,
    _needs_columns,
    _resolve_method,
    _vectorised,
    replicate_values,
    resample_paired,
)
from .verdicts import Comparison

__all__ = ["compare_predictions", "pooled_replicates", "check_predictions", "best_baseline", "paired_comparison",
           "run_labels"]

SPLITS = ("val", "test")


def _copies(predictions, name: str) -> np.ndarray:
    """(r, n) int64 from (n,) or (r, n) predictions."""
    array = np.asarray(predictions)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[0] < 1 or not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{name} must be integer predictions (n,) or (repeats, n), but got {array.dtype} "
                        f"{array.shape}.")
    return array.astype(np.int64)


def pooled_replicates(
    labels, predictions: Mapping[str, Any], *, n_classes: int, resamples: int = DEFAULT_RESAMPLES, seed=0,
    columns: bool = False, full: bool = False,
) -> dict[str, Replicates]:
    """Paired replicates of several classifiers, each with one or more copies scored on the same images.

    Args:
        labels: (n,) true classes.
        predictions: name -> (n,) or (r, n) predictions (r copies; r may differ between names).
        n_classes, resamples, seed, columns, full: as :func:`~selmix_ray.uncertainty.resample_paired`.

    Returns:
        name -> Replicates of the copies' summed confusions (``sizes`` = r n_k, so recalls and coverages
        are those of the pooled counts). Every copy of every name sees the same resampled images.
    """
    arrays = {name: _copies(value, f"predictions[{name!r}]") for name, value in predictions.items()}
    flat = {(name, c): array[c] for name, array in arrays.items() for c in range(array.shape[0])}
    drawn = resample_paired(labels, flat, n_classes=n_classes, resamples=resamples, seed=seed, columns=columns,
                            full=full)
    out = {}
    for name, array in arrays.items():
        parts = [drawn[(name, c)] for c in range(array.shape[0])]

        def total(field: str, parts=parts):
            values = [getattr(part, field) for part in parts]
            return None if values[0] is None else sum(values[1:], values[0])

        out[name] = replace(parts[0], sizes=parts[0].sizes * len(parts), diagonal=total("diagonal"),
                            columns=total("columns"), confusions=total("confusions"))
    return out


def compare_predictions(
    labels, trial_predictions, baseline_predictions, objective: Objective, *, n_classes: int,
    level: float = DEFAULT_LEVEL, method: str = "auto", resamples: int = DEFAULT_RESAMPLES, seed=0,
) -> Comparison:
    """Trial against baseline on the same images (paired), each side with one or more copies.

    Args:
        labels: (n,) true classes of the images.
        trial_predictions, baseline_predictions: (n,) or (repeats, n) predictions on those images.
        objective: scores both (its value on each side's summed confusion counts).
        n_classes: K. level, method, resamples, seed: as :func:`~selmix_ray.verdicts.compare_paired`, which
            this equals when each side has one copy.
    """
    _check_objective(objective)
    sides = {"trial": trial_predictions, "baseline": baseline_predictions}
    replicates = pooled_replicates(labels, sides, n_classes=n_classes, resamples=resamples, seed=seed,
                                   columns=_needs_columns(objective), full=not _vectorised(objective))
    labels = np.asarray(labels)
    points = [objective.value(sum(confusion_counts(labels, row, n_classes) for row in _copies(value, name)))
              for name, value in sides.items()]
    return Comparison.from_draws(*points, replicate_values(objective, replicates["trial"]),
                                 replicate_values(objective, replicates["baseline"]), level=level,
                                 method=_resolve_method(method, objective), paired=True)


def check_predictions(labels, predictions, counts, *, n_classes: int, what: str) -> None:
    """Raise DataError unless the predictions reproduce the stored counts.

    Args:
        labels: (n,) true classes.
        predictions: (n,) or (r, n).
        counts: (K, K) the counts stored beside them (summed over the r copies), or a list of r (K, K), one
            per copy.
        what: names the source in the error ("trial 3f2a_00001", "baseline 'erm'").
    """
    labels = np.asarray(labels)
    copies = _copies(predictions, what)
    if copies.shape[1] != labels.shape[0]:
        raise DataError(f"{what}: {copies.shape[1]} predictions per copy, but {labels.shape[0]} labels; the "
                        "predictions and labels come from different splits or features.")
    found = [confusion_counts(labels, row, n_classes) for row in copies]
    expected = list(counts) if isinstance(counts, list) else [np.asarray(counts)]
    if not isinstance(counts, list):
        found = [sum(found)]
    if len(found) != len(expected) or any(not np.array_equal(f, e) for f, e in zip(found, expected)):
        raise DataError(
            f"{what}: the stored per-image predictions do not reproduce its stored confusion counts against "
            "these labels, so they cannot be paired with them (were the labels or baselines written for other "
            "features?). Compare unpaired (verdicts.compare) or rerun the baselines."
        )


def best_baseline(baselines: Mapping[str, dict]) -> str | None:
    """Name of the baseline with the highest validation score (first on ties); None without one."""
    scores = {name: baseline_row(name, record)[SCORE_KEY] for name, record in baselines.items()}
    scores = {name: score for name, score in scores.items() if score is not None}
    return max(scores, key=scores.__getitem__) if scores else None


def paired_comparison(
    run, trial_id: str, *, baseline: str | None = None, objective: str | None = None, split: str = "val",
    level: float = DEFAULT_LEVEL, method: str = "auto", resamples: int = DEFAULT_RESAMPLES, seed=0,
) -> Comparison | None:
    """A trial of a loaded experiment against a baseline, paired on the stored predictions.

    Args:
        run: a :class:`~selmix_ray.results.Run` (``load_run(path)``).
        trial_id: the trial.
        baseline: a baseline name (default: :func:`best_baseline`).
        objective: default the sweep's own (with its parameters); head/tail objectives use the
            experiment's training counts.
        split: "val" or "test".

    Returns:
        The paired :class:`~selmix_ray.verdicts.Comparison`, or None when the experiment predates stored
        predictions (the trial's, the baseline's or the labels are missing): compare unpaired then.

    Raises:
        DataError: the stored predictions do not reproduce their stored counts (:func:`check_predictions`).
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, but got {split=!r}.")
    baseline = baseline or best_baseline(run.baselines)
    if baseline not in run.baselines:
        raise ExperimentError(f"{run.path} has no baseline {baseline!r}; it has "
                              f"{', '.join(run.baselines) or 'none'}.")
    labels = run_labels(run, split)
    history = run.history(trial_id)
    record = run.baselines[baseline]
    trial = getattr(history, f"{split}_predictions")
    base = baseline_predictions(record, split)
    if labels is None or trial is None or base is None:
        return None
    K = history.n_classes
    check_predictions(labels, trial, [copy.confusion(copy.best_index(), split) for copy in history.copies],
                      n_classes=K, what=f"trial {trial_id}")
    check_predictions(labels, base, dense_counts(record[split]["counts"], K), n_classes=K,
                      what=f"baseline {baseline!r}")
    name = objective or run.objective
    params = run.objective_params if name == run.objective else {}
    scorer = get_objective(name, train_counts=run.train_counts(), **params)
    return compare_predictions(labels, trial, base, scorer, n_classes=K, level=level, method=method,
                               resamples=resamples, seed=seed)


def run_labels(run, split: str = "val") -> np.ndarray | None:
    """(n,) int64 true classes of ``split``, stored once in the experiment's baselines.json (``Run.baselines``
    holds only the records); None when the file is absent or older than stored predictions."""
    path = run.path / BASELINES_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ExperimentError(f"{path} is unreadable: {error}.") from error
    return stored_labels(data, split) if isinstance(data, dict) else None
