"""Confusion matrices and the reported metrics (numpy only).

Conventions, stated once for the whole package:

- A confusion matrix has rows = true class, columns = predicted class. ``counts`` are integers
  (or non-negative floats); ``C`` is the joint-frequency form ``counts / counts.sum()``.
- Recall of class k is ``C[k, k] / C[k, :].sum()``; a class with no sample has no recall, and every
  function here raises :class:`UndefinedMetricError` naming it instead of dropping it.
- Coverage of class l is ``C[:, l].sum()``, a joint frequency: a perfectly balanced prediction has
  coverage 1/K.
- Head / tail: classes sorted by *training* count, descending, ties by index; the first
  ``floor(0.9 K)`` are the head, the rest the tail, with at least one class in each.
"""

from __future__ import annotations

import math

import numpy as np

from .constants import HEAD_FRACTION
from .errors import DataError, UndefinedMetricError

__all__ = [
    "confusion_counts",
    "joint_confusion",
    "recalls",
    "head_mask",
    "metric_values",
    "summarize",
]


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion counts, shape (n_classes, n_classes), int64; rows = true, columns = predicted.

    Args:
        y_true: (n_samples,) integer labels in [0, n_classes).
        y_pred: (n_samples,) integer predictions in [0, n_classes).
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.ndim != 1 or y_true.shape != y_pred.shape:
        raise DataError(
            f"y_true and y_pred must be 1-D of the same length, but got shapes {y_true.shape} and {y_pred.shape}."
        )
    if n_classes < 2:
        raise DataError(f"n_classes must be >= 2, but got {n_classes=}.")
    for name, labels in (("y_true", y_true), ("y_pred", y_pred)):
        if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
            raise DataError(
                f"{name} must lie in [0, {n_classes}), but got values in [{labels.min()}, {labels.max()}]."
            )
    flat = y_true.astype(np.int64) * n_classes + y_pred.astype(np.int64)
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def joint_confusion(confusion: np.ndarray) -> np.ndarray:
    """Validate counts or frequencies (K, K) and return the joint frequencies C (float64, sums to 1)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1] or confusion.shape[0] < 2:
        raise DataError(f"A confusion matrix must be square (K, K) with K >= 2, but got shape {confusion.shape}.")
    if not np.all(np.isfinite(confusion)):
        raise DataError("The confusion matrix contains NaN or inf; expected finite non-negative counts.")
    if np.any(confusion < 0):
        row, col = np.argwhere(confusion < 0)[0]
        raise DataError(
            f"Confusion entries must be >= 0, but entry ({row}, {col}) is {confusion[row, col]!r}."
        )
    total = confusion.sum()
    if total <= 0:
        raise DataError("The confusion matrix is all zeros: there is no sample to measure.")
    C = confusion / total
    empty = np.flatnonzero(C.sum(axis=1) == 0)
    if empty.size:
        names = ", ".join(str(k) for k in empty[:10])
        raise UndefinedMetricError(
            f"Recall is undefined for class {names}: it has no validation sample. "
            "Every class needs at least one sample in the split that is evaluated."
        )
    return C


def recalls(confusion: np.ndarray) -> np.ndarray:
    """Per-class recall, shape (K,), from counts or frequencies (K, K)."""
    C = joint_confusion(confusion)
    return np.diag(C) / C.sum(axis=1)


def head_mask(train_counts: np.ndarray | None, n_classes: int) -> np.ndarray:
    """Boolean (K,): True for head classes, by training count (None: class 0 most frequent)."""
    if train_counts is None:
        order = np.arange(n_classes)
    else:
        train_counts = np.asarray(train_counts)
        if train_counts.shape != (n_classes,):
            raise DataError(f"train_counts must have shape ({n_classes},), but got {train_counts.shape}.")
        order = np.lexsort((np.arange(n_classes), -train_counts))  # count descending, then index
    n_head = min(max(int(math.floor(HEAD_FRACTION * n_classes)), 1), n_classes - 1)
    mask = np.zeros(n_classes, dtype=bool)
    mask[order[:n_head]] = True
    return mask


def metric_values(C: np.ndarray, head: np.ndarray) -> dict[str, float]:
    """Every reported metric (no floor) of a validated joint confusion C (K, K).

    Returns mean_recall, min_recall, min_head_tail_recall, gmean, hmean, min_coverage, accuracy.
    """
    r = np.diag(C) / C.sum(axis=1)
    if np.any(r <= 0):
        gmean = 0.0
        hmean = 0.0
    else:
        gmean = float(np.exp(np.mean(np.log(r))))
        hmean = float(len(r) / np.sum(1.0 / r))
    return {
        "mean_recall": float(r.mean()),
        "min_recall": float(r.min()),
        "min_head_tail_recall": float(min(r[head].mean(), r[~head].mean())),
        "gmean": gmean,
        "hmean": hmean,
        "min_coverage": float(C.sum(axis=0).min()),
        "accuracy": float(np.trace(C)),
    }


def summarize(confusion: np.ndarray, *, train_counts: np.ndarray | None = None, objective=None) -> dict:
    """Reported scalars plus per-class recall for one confusion matrix (counts or frequencies).

    Args:
        confusion: (K, K), rows = true class.
        train_counts: (K,) training counts that define head and tail (None: class index order).
        objective: an ``objectives.Objective``; when given, ``"objective"`` is its ``value(C)``.

    Returns:
        ``{"mean_recall": ..., ..., "accuracy": ..., ["objective": ...], "recall": ndarray (K,)}``.
    """
    C = joint_confusion(confusion)
    out: dict = metric_values(C, head_mask(train_counts, C.shape[0]))
    if objective is not None:
        out["objective"] = float(objective.value(C))
    out["recall"] = np.diag(C) / C.sum(axis=1)
    return out
