"""Baselines: computed on the driver (no Ray) and cached; their records read back by results' helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from selmix_ray.baselines import BASELINES, baseline_recall, baseline_row, baseline_score, compute_baselines
from selmix_ray.constants import SCORE_KEY
from selmix_ray.history import dense_counts
from selmix_ray.metrics import confusion_counts
from selmix_ray.space import load_space

SPACE = {"objective": "min_recall", "space": {"lr": {"loguniform": [0.1, 10.0]}},
         "fixed": {"steps": 20, "eval_every": 10}}


def test_computed_once_then_read_from_the_cache(digits, cache_home):
    lines = []
    first = compute_baselines(digits, load_space(SPACE), repeats=1, seed=7, log=lines.append)
    assert set(first["baselines"]) == set(BASELINES) and first["feature_key"] == digits.key
    assert [line.split()[1] for line in lines] == list(BASELINES)
    lines.clear()
    cached = compute_baselines(digits, load_space(SPACE), repeats=1, seed=7, log=lines.append)
    assert cached == json.loads(json.dumps(first))
    assert len(lines) == 1 and lines[0].startswith("baselines: cached")

    # The starting head (steps = 0): its stored val counts are the confusion of the initial head itself.
    start = first["baselines"]["start"]
    predictions = np.argmax(digits.val.x @ digits.weight.T + digits.bias, axis=1)
    expected = confusion_counts(digits.val.y, predictions, digits.n_classes)
    np.testing.assert_array_equal(dense_counts(start["val"]["counts"], digits.n_classes), expected)
    recall = np.diag(expected) / expected.sum(axis=1)
    np.testing.assert_allclose(start["per_class_recall"]["val"], recall)
    assert start["metrics"][SCORE_KEY] == pytest.approx(recall.min(), abs=1e-12)


def _record(counts: np.ndarray, **metrics) -> dict:
    rows, cols = np.nonzero(counts)
    return {"metrics": metrics, "n_classes": len(counts),
            "val": {"counts": [[int(r), int(c), float(counts[r, c])] for r, c in zip(rows, cols)]},
            "per_class_recall": {"test": [0.5, 1.0, 0.25]}}


def test_score_row_and_recall_of_a_record():
    counts = np.array([[8, 2, 0], [1, 9, 0], [3, 0, 1]], dtype=float)  # recalls 0.8, 0.9, 0.25
    record = _record(counts, **{SCORE_KEY: 0.4, "test_at_best/min_recall": 0.3, "test/gmean": 0.6})
    # The sweep's own objective: the stored score. Another: from the stored val counts, by hand.
    assert baseline_score(record, "min_recall", own_objective="min_recall", train_counts=None) == 0.4
    assert baseline_score(record, "mean_recall", own_objective="min_recall", train_counts=None) == \
        pytest.approx((0.8 + 0.9 + 0.25) / 3)
    assert baseline_score(record, "gmean", own_objective="min_recall", train_counts=None) == \
        pytest.approx((0.8 * 0.9 * 0.25) ** (1 / 3))
    assert baseline_score({"metrics": {}}, "gmean", own_objective="min_recall", train_counts=None) is None
    row = baseline_row("start", record)
    assert row["name"] == "start" and row["kind"] == "baseline" and row[SCORE_KEY] == 0.4
    assert row["test_at_best/min_recall"] == 0.3 and row["test_at_best/gmean"] == 0.6  # test/<m> as fallback
    np.testing.assert_array_equal(baseline_recall(record, "test"), [0.5, 1.0, 0.25])
    assert baseline_recall(record, "val") is None
    older = {"records": [{"test": {"recall": [0.1, 0.2, 0.3]}}]}  # a history-like record
    np.testing.assert_array_equal(baseline_recall(older, "test"), [0.1, 0.2, 0.3])
