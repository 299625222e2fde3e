"""metrics.py against values worked out by hand."""

import numpy as np
import pytest

from selmix_ray.errors import DataError, SelMixError, UndefinedMetricError
from selmix_ray.metrics import confusion_counts, head_mask, joint_confusion, recalls, summarize


def test_confusion_counts_rows_true_columns_predicted():
    counts = confusion_counts(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2]), 3)
    expected = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    np.testing.assert_array_equal(counts, expected)


def test_summary_hand_worked_k3():
    # Recalls 1/2, 1, 2/3; 6 samples; head/tail by class order: floor(0.9 * 3) = 2 head classes.
    counts = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    out = summarize(counts)
    r = np.array([0.5, 1.0, 2 / 3])
    np.testing.assert_allclose(out["recall"], r)
    assert out["mean_recall"] == pytest.approx(r.mean())
    assert out["min_recall"] == pytest.approx(0.5)
    assert out["min_head_tail_recall"] == pytest.approx(min(0.75, 2 / 3))
    assert out["gmean"] == pytest.approx((0.5 * 1.0 * 2 / 3) ** (1 / 3))
    assert out["hmean"] == pytest.approx(3 / (2 + 1 + 1.5))
    assert out["min_coverage"] == pytest.approx(2 / 6)  # every column holds 2 of the 6 predictions
    assert out["accuracy"] == pytest.approx(4 / 6)


def test_min_coverage_is_the_smallest_column_frequency():
    assert summarize(np.array([[2, 0], [2, 1]]))["min_coverage"] == pytest.approx(1 / 5)


def test_zero_recall_gives_zero_gmean_and_hmean():
    counts = np.array([[3, 0], [2, 0]])
    out = summarize(counts)
    assert out["gmean"] == 0.0 and out["hmean"] == 0.0 and out["min_recall"] == 0.0


def test_head_mask_uses_training_counts_with_ties_by_index():
    # K = 10: 9 head classes; the tail is the least frequent class, ties broken by larger index last.
    counts = np.array([5, 50, 5, 40, 30, 20, 10, 8, 7, 6])
    mask = head_mask(counts, 10)
    assert mask.sum() == 9 and not mask[2] and mask[0]
    # K = 2 keeps one class on each side.
    assert head_mask(None, 2).tolist() == [True, False]


def test_missing_class_raises_naming_it():
    counts = np.array([[3, 1, 0], [0, 0, 0], [1, 0, 2]])
    with pytest.raises(UndefinedMetricError, match="class 1"):
        recalls(counts)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN or inf"),
        (np.array([[1.0, -1.0], [0.0, 1.0]]), ">= 0"),
        (np.ones((2, 3)), "square"),
        (np.zeros((2, 2)), "all zeros"),
    ],
)
def test_bad_confusion_raises(bad, message):
    with pytest.raises(DataError, match=message):
        joint_confusion(bad)


def test_bad_labels_raise():
    with pytest.raises(SelMixError, match=r"\[0, 3\)"):
        confusion_counts(np.array([0, 3]), np.array([0, 1]), 3)
