"""Per-image predictions at the best report (engine, history, baselines) and the paired comparison built on
them (selmix_ray.pairing).

The independent reference for every stored prediction: ``np.bincount(label * K + prediction)`` must equal the
confusion counts stored beside it, which the engine computes on its own path.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from selmix_ray.baselines import BASELINES, baseline_predictions, compute_baselines, stored_labels
from selmix_ray.engine import FinetuneConfig, FinetuneState, Trainer, finetune, finetune_repeats
from selmix_ray.errors import DataError
from selmix_ray.history import History, decode_predictions, dense_counts, encode_predictions
from selmix_ray.objectives import get_objective
from selmix_ray.pairing import (
    best_baseline,
    check_predictions,
    compare_predictions,
    paired_comparison,
    run_labels,
)
from selmix_ray.results import TrialHistory
from selmix_ray.space import load_space
from selmix_ray.verdicts import compare_paired

SHORT = {"steps": 30, "eval_every": 10, "refresh_every": 5, "batch_size": 16, "device": "cpu"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def features(synthetic_features):
    return synthetic_features(pool=5)


def bincount_confusion(labels, predictions, K) -> np.ndarray:
    """The reference: (K, K) counts by one bincount, written apart from metrics.confusion_counts."""
    flat = np.asarray(labels, dtype=np.int64) * K + np.asarray(predictions, dtype=np.int64)
    return np.bincount(flat, minlength=K * K).reshape(K, K)


# -- encoding ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top, dtype", [(3, "uint8"), (255, "uint8"), (999, "uint16"), (70_000, "int32")])
def test_encoding_round_trips_in_the_smallest_integer_type(top, dtype):
    rng = np.random.default_rng(top)
    for shape in [(0,), (1,), (57,), (3, 40)]:
        array = rng.integers(0, top + 1, size=shape)
        if array.size:
            array.flat[0] = top  # the largest value decides the type
        encoded = json.loads(json.dumps(encode_predictions(array)))  # through JSON, as on disk
        decoded = decode_predictions(encoded)
        assert decoded.dtype == np.int64 and decoded.shape == shape
        np.testing.assert_array_equal(decoded, array)
        if array.size:
            assert encoded["dtype"] == dtype


def test_encoding_refuses_what_is_not_a_class_index():
    with pytest.raises(DataError, match="integers"):
        encode_predictions(np.array([0.0, 1.0]))
    with pytest.raises(DataError, match=r"\[0, 2\*\*31\)"):
        encode_predictions(np.array([0, -1]))


def test_history_round_trip_with_predictions_and_old_histories_without():
    old = {"records": [], "best_p": None, "best_step": None, "meta": {"n_classes": 3}}  # written before
    history = History.from_dict(old)
    assert history.best_val_predictions is None and history.best_test_predictions is None
    assert History.from_json(history.to_json()).to_dict() == old  # unchanged form when absent
    assert TrialHistory("t", [history]).val_predictions is None

    history.best_val_predictions = np.array([2, 0, 1, 1])
    history.best_test_predictions = np.array([0, 0, 2])
    restored = History.from_json(history.to_json())
    np.testing.assert_array_equal(restored.best_val_predictions, [2, 0, 1, 1])
    np.testing.assert_array_equal(restored.best_test_predictions, [0, 0, 2])
    other = History.from_dict({**old, "best_val_predictions": encode_predictions([1, 1, 1, 0])})
    trial = TrialHistory("t", [restored, other])
    np.testing.assert_array_equal(trial.val_predictions, [[2, 0, 1, 1], [1, 1, 1, 0]])  # (repeats, n_val)
    assert trial.test_predictions is None  # one copy lacks them


# -- engine --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, posthoc", [("selmix", "none"), ("selmix", "class_weights"),
                                             ("erm", "logit_adjust"), ("uniform_mixup", "none")])
def test_stored_predictions_reproduce_the_best_reports_counts(features, method, posthoc):
    reports = []
    history = finetune(features, FinetuneConfig.from_dict({**SHORT, "method": method, "posthoc": posthoc}),
                       report=reports.append)
    best = history.best_index()
    assert history.steps[best] == history.best_step
    K = features.n_classes
    for split, labels in (("val", features.val.y), ("test", features.test.y)):
        predictions = getattr(history, f"best_{split}_predictions")
        assert predictions.shape == labels.shape and predictions.dtype == np.int64
        np.testing.assert_array_equal(bincount_confusion(labels, predictions, K), history.confusion(best, split))
    # the selected report's scalar comes from the same predictions
    scorer = get_objective("min_recall")
    value = scorer.value(bincount_confusion(features.val.y, history.best_val_predictions, K))
    assert reports[-1]["val/best_objective"] == pytest.approx(value, abs=1e-12)


def test_predictions_are_the_models_at_the_best_step(features):
    """Without post-hoc, the stored validation predictions are the arg-max of the model at best_step."""
    config = FinetuneConfig.from_dict({**SHORT, "posthoc": "none"})
    history = finetune(features, config)
    trainer = Trainer(features, config)
    trainer.run_until(0)
    for step in trainer.pending_report_steps():
        if step > history.best_step:
            break
        trainer.run_until(step)
    np.testing.assert_array_equal(trainer.logits("val").argmax(axis=1), history.best_val_predictions)


def test_predictions_survive_resume_and_repeats(features, tmp_path):
    config = FinetuneConfig.from_dict({**SHORT, "posthoc": "class_weights"})
    whole = finetune(features, config)
    mid = []
    finetune(features, config, checkpoint=mid.append)
    mid[1].save(tmp_path / "mid.pt")
    resumed = finetune(features, config, state=FinetuneState.load(tmp_path / "mid.pt"))
    np.testing.assert_array_equal(resumed.best_val_predictions, whole.best_val_predictions)
    np.testing.assert_array_equal(resumed.best_test_predictions, whole.best_test_predictions)

    copies = finetune_repeats(features, config, repeats=2)
    trial = TrialHistory("t", copies)
    assert trial.val_predictions.shape == (2, len(features.val.y))
    for c, copy in enumerate(copies):
        np.testing.assert_array_equal(bincount_confusion(features.val.y, trial.val_predictions[c], 4),
                                      copy.confusion(copy.best_index(), "val"))


# -- baselines -----------------------------------------------------------------------------------------


def test_baselines_store_labels_once_and_predictions_that_reproduce_their_counts(features):
    space = load_space({"objective": "min_recall", "space": {"lr": {"loguniform": [0.1, 10.0]}},
                        "fixed": {"steps": 20, "eval_every": 10, "batch_size": 16}})
    out = json.loads(json.dumps(compute_baselines(features, space, repeats=2, seed=3)))
    K = features.n_classes
    np.testing.assert_array_equal(stored_labels(out, "val"), features.val.y)
    np.testing.assert_array_equal(stored_labels(out, "test"), features.test.y)
    assert set(out["baselines"]) == set(BASELINES)
    for name, record in out["baselines"].items():
        for split, labels in (("val", features.val.y), ("test", features.test.y)):
            predictions = baseline_predictions(record, split)
            assert predictions.shape == (2, labels.size), name
            pooled = sum(bincount_confusion(labels, row, K) for row in predictions)
            np.testing.assert_array_equal(pooled, dense_counts(record[split]["counts"], K))
    # the starting head is the initial head itself, in both copies
    start = baseline_predictions(out["baselines"]["start"], "val")
    head = np.argmax(features.val.x @ features.weight.T + features.bias, axis=1)
    np.testing.assert_array_equal(start, np.stack([head, head]))
    # format-2 files and records: no labels, no predictions
    assert stored_labels({"format": 2, "baselines": {}}) is None
    assert baseline_predictions({"val": {"counts": []}}, "val") is None


# -- pairing -------------------------------------------------------------------------------------------


def _labelled(K=4, n_k=30, seed=0, accuracy=(0.9, 0.8)):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(K), n_k))
    out = []
    for acc in accuracy:
        wrong = rng.random(labels.size) > acc
        out.append(np.where(wrong, (labels + rng.integers(1, K, labels.size)) % K, labels))
    return labels, out


@pytest.mark.parametrize("objective", ["min_recall", "mean_recall", "hmean", "mean_recall_min_coverage"])
def test_one_copy_each_equals_compare_paired(objective):
    labels, (trial, baseline) = _labelled()
    scorer = get_objective(objective)
    ours = compare_predictions(labels, trial, baseline, scorer, n_classes=4, resamples=300, seed=5)
    theirs = compare_paired(labels, trial, baseline, scorer, n_classes=4, resamples=300, seed=5)
    assert ours == theirs and ours.paired


def test_repeats_pool_copies_and_never_count_an_image_twice():
    labels, (a, b) = _labelled(seed=1)
    scorer = get_objective("mean_recall")
    one = compare_predictions(labels, a, b, scorer, n_classes=4, resamples=400, seed=2)
    # identical copies: the pooled counts are r times the counts, the same images are drawn: same result
    doubled = compare_predictions(labels, np.stack([a, a, a]), np.stack([b, b]), scorer, n_classes=4,
                                  resamples=400, seed=2)
    assert (doubled.difference, doubled.low, doubled.high) == pytest.approx((one.difference, one.low, one.high))
    # a trial against itself: every replicate's difference is 0
    same = compare_predictions(labels, np.stack([a, b]), np.stack([b, a]), scorer, n_classes=4, resamples=200)
    assert (same.difference, same.low, same.high) == (0.0, 0.0, 0.0)
    # the point value is the objective of the summed counts (by hand: mean recall of pooled copies)
    pooled = bincount_confusion(labels, a, 4) + bincount_confusion(labels, b, 4)
    assert same.trial == pytest.approx(np.mean(np.diag(pooled) / pooled.sum(axis=1)))


def test_paired_interval_is_narrower_when_the_two_err_on_the_same_images():
    """The reason to store predictions: a trial that fixes a few of a baseline's errors."""
    from selmix_ray.verdicts import compare

    labels, (baseline, _) = _labelled(K=5, n_k=50, seed=3, accuracy=(0.8, 0.8))
    trial = baseline.copy()
    rng = np.random.default_rng(0)
    wrong = np.flatnonzero(trial != labels)
    fixed = rng.choice(wrong, size=wrong.size // 4, replace=False)
    trial[fixed] = labels[fixed]
    scorer = get_objective("mean_recall")
    paired = compare_predictions(labels, trial, baseline, scorer, n_classes=5, resamples=500)
    unpaired = compare(bincount_confusion(labels, trial, 5), bincount_confusion(labels, baseline, 5), scorer,
                       resamples=500)
    assert paired.difference == pytest.approx(unpaired.difference)
    assert paired.low > 0 and unpaired.low < 0  # paired sees the gain; unpaired cannot
    assert paired.high - paired.low < 0.5 * (unpaired.high - unpaired.low)


def test_check_predictions_refuses_predictions_that_do_not_match_their_counts():
    labels, (a, b) = _labelled(seed=4)
    counts = [bincount_confusion(labels, a, 4), bincount_confusion(labels, b, 4)]
    check_predictions(labels, np.stack([a, b]), counts, n_classes=4, what="trial x")  # per copy
    check_predictions(labels, np.stack([a, b]), counts[0] + counts[1], n_classes=4, what="trial x")  # pooled
    with pytest.raises(DataError, match="trial x: the stored per-image predictions do not reproduce"):
        check_predictions(np.roll(labels, 1), a, counts[0], n_classes=4, what="trial x")
    with pytest.raises(DataError, match="predictions per copy, but 119 labels"):
        check_predictions(labels[:-1], a, counts[0], n_classes=4, what="trial x")


def test_best_baseline_is_the_highest_validation_score_first_on_ties():
    records = {"a": {"metrics": {"val/best_objective": 0.4}}, "b": {"metrics": {"val/best_objective": 0.6}},
               "c": {"metrics": {"val/best_objective": 0.6}}, "d": {"metrics": {}}}
    assert best_baseline(records) == "b"
    assert best_baseline({}) is None


def test_an_experiment_written_before_predictions_gives_none(tmp_path):
    """Old baselines.json (format 2) and histories without predictions: no paired comparison, no error."""
    from types import SimpleNamespace

    counts = [[0, 0, 5], [1, 1, 5]]
    record = {"metrics": {"val/best_objective": 0.5}, "n_classes": 2, "val": {"counts": counts}}
    (tmp_path / "baselines.json").write_text(json.dumps({"format": 2, "baselines": {"start": record}}))
    history = History(records=[{"step": 0, "metrics": {}, "val": {"counts": counts, "recall": [1, 1]}}],
                      best_step=0, meta={"n_classes": 2})
    run = SimpleNamespace(path=tmp_path, baselines={"start": record}, objective="min_recall",
                          objective_params={}, history=lambda trial_id: TrialHistory(trial_id, [history]),
                          train_counts=lambda: None)
    assert run_labels(run) is None
    assert paired_comparison(run, "t") is None
    record["val_predictions"] = encode_predictions([[0] * 5 + [1] * 5])
    history.best_val_predictions = np.array([0] * 5 + [1] * 5)
    assert paired_comparison(run, "t") is None  # still no labels


# -- end to end ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_sweep_stores_predictions_that_pair_trials_with_baselines(sweep, digits):
    from selmix_ray.results import load_run

    run = load_run(sweep)
    raw = json.loads((sweep / "baselines.json").read_text())
    np.testing.assert_array_equal(stored_labels(raw, "val"), digits.val.y)
    np.testing.assert_array_equal(run_labels(run, "test"), digits.test.y)
    baseline = best_baseline(run.baselines)
    K = digits.n_classes
    compared = 0
    for trial_id in run.df["trial_id"]:
        history = run.history(trial_id)
        predictions = history.val_predictions
        assert predictions.shape == (1, len(digits.val.y))
        np.testing.assert_array_equal(bincount_confusion(digits.val.y, predictions[0], K),
                                      history.confusion(history.best_index(), "val"))
        np.testing.assert_array_equal(bincount_confusion(digits.test.y, history.test_predictions[0], K),
                                      history.confusion(history.best_index(), "test"))
        comparison = paired_comparison(run, trial_id, resamples=200)
        assert comparison.paired
        score = run.df.loc[run.df["trial_id"] == trial_id, "val/best_objective"].item()
        assert comparison.trial == pytest.approx(score, abs=1e-12)
        assert comparison.baseline == pytest.approx(run.baselines[baseline]["metrics"]["val/best_objective"],
                                                    abs=1e-12)
        test = paired_comparison(run, trial_id, split="test", resamples=200)
        assert test.trial == pytest.approx(
            run.df.loc[run.df["trial_id"] == trial_id, "test_at_best/objective"].item(), abs=1e-12)
        compared += 1
    assert compared == len(run.df) >= 2
