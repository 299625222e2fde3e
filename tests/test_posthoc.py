"""Post-hoc corrections: identity, gains on held-out data, cross-fitting, relabelling, degenerate inputs."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from selmix_ray import posthoc
from selmix_ray.errors import ConfigError, DataError
from selmix_ray.metrics import confusion_counts, recalls
from selmix_ray.objectives import get_objective


def _long_tailed(n_classes=10, per_class=40, test_per_class=200, seed=0, rho=100.0, separation=2.0):
    """Logits of a head trained on a long-tailed split: class signal + noise + log(training prior).

    Returns train_counts (K,), (validation logits, labels), (test logits, labels).
    """
    rng = np.random.default_rng(seed)
    train_counts = np.round(1000 * rho ** (-np.arange(n_classes) / (n_classes - 1))).astype(np.int64)
    log_prior = np.log(train_counts / train_counts.sum())

    def draw(per):
        labels = np.repeat(np.arange(n_classes), per)
        logits = separation * np.eye(n_classes)[labels] + rng.normal(size=(labels.size, n_classes)) + log_prior
        return logits, labels

    return train_counts, draw(per_class), draw(test_per_class)


def _min_recall(logits, labels):
    return float(recalls(confusion_counts(labels, logits.argmax(axis=1), logits.shape[1])).min())


def test_kinds():
    assert posthoc.KINDS == ("none", "logit_adjust", "class_weights")


def test_none_is_the_identity():
    train_counts, (logits, labels), _ = _long_tailed(seed=1)
    objective = get_objective("min_recall", train_counts=train_counts)
    correction = posthoc.fit_correction("none", logits, labels, objective, train_counts=train_counts)
    assert np.array_equal(correction.apply(logits), logits)
    counts = posthoc.cross_fitted_confusion(
        "none", logits, labels, objective, train_counts=train_counts, n_classes=10, seed=3
    )
    assert np.array_equal(counts, confusion_counts(labels, logits.argmax(axis=1), 10))


@pytest.mark.parametrize("kind", ["logit_adjust", "class_weights"])
def test_corrections_raise_held_out_min_recall(kind):
    train_counts, (val_logits, val_labels), (test_logits, test_labels) = _long_tailed(seed=2)
    objective = get_objective("min_recall", train_counts=train_counts)
    correction = posthoc.fit_correction(kind, val_logits, val_labels, objective, train_counts=train_counts)
    before = _min_recall(test_logits, test_labels)
    after = _min_recall(correction.apply(test_logits), test_labels)
    assert before < 0.1
    assert after > before + 0.3


def test_class_weights_without_train_counts_still_help():
    train_counts, (val_logits, val_labels), (test_logits, test_labels) = _long_tailed(seed=4)
    objective = get_objective("min_recall", train_counts=train_counts)
    correction = posthoc.fit_correction("class_weights", val_logits, val_labels, objective, train_counts=None)
    assert _min_recall(correction.apply(test_logits), test_labels) > _min_recall(test_logits, test_labels) + 0.2


def test_logit_adjust_finds_the_bias_it_was_built_with():
    # the logits carry exactly + 1.0 * log(prior): on a large clean validation set tau = 1 is best for mean recall
    train_counts, (logits, labels), _ = _long_tailed(per_class=2000, seed=5, separation=3.0)
    objective = get_objective("mean_recall", train_counts=train_counts)
    correction = posthoc.fit_correction("logit_adjust", logits, labels, objective, train_counts=train_counts)
    assert correction.params["tau"] == 1.0
    log_prior = np.log(train_counts / train_counts.sum())
    np.testing.assert_allclose(correction.offsets, -log_prior)


def test_switch_benefit_matches_reclassifying_each_class():
    rng = np.random.default_rng(0)
    n_samples, n_classes = 200, 6
    adjusted = rng.normal(size=(n_samples, n_classes))
    labels = rng.integers(0, n_classes, size=n_samples)
    G = rng.normal(size=(n_classes, n_classes))
    eta = 0.4
    near = posthoc._NearTop(adjusted)
    near.track(np.zeros(n_classes), eta)
    assert np.array_equal(near.predict(), adjusted.argmax(axis=1))
    benefit = near.switch_benefit(labels, G, eta)

    def linear(logits):
        C = confusion_counts(labels, logits.argmax(axis=1), n_classes) / n_samples
        return float((G * C).sum())

    for m in range(n_classes):  # slow reference: raise class m's offset and reclassify
        raised = adjusted.copy()
        raised[:, m] += eta
        assert benefit[m] == pytest.approx(linear(raised) - linear(adjusted), abs=1e-12)


# -- the former dense computation, O(n K) per round, kept as the reference of the fast one --------------


def _dense_switch_benefit(adjusted, pred, labels, G, eta):
    n_samples, n_classes = adjusted.shape
    gap = adjusted[np.arange(n_samples), pred][:, None] - adjusted
    sample, target = np.nonzero((gap > 0) & (gap < eta))
    true = labels[sample]
    change = G[true, target] - G[true, pred[sample]]
    return np.bincount(target, weights=change, minlength=n_classes) / n_samples


def _dense_class_weights(logits, labels, objective, start, rounds):
    n_samples, n_classes = logits.shape
    step0 = posthoc._initial_step(logits)
    log_w = start - start.mean()
    best_log_w, best_key, best_round = log_w.copy(), (-np.inf, -np.inf), 0
    for t in range(rounds):
        adjusted = logits + log_w
        pred = adjusted.argmax(axis=1)
        C = confusion_counts(labels, pred, n_classes) / n_samples
        key = (objective.value(C), float(np.mean(np.diag(C) / C.sum(axis=1))))
        if posthoc._better(key, best_key):
            best_log_w, best_key, best_round = log_w.copy(), key, t
        objective.update(C)
        G = objective.grad(C)
        eta = step0 / np.sqrt(1.0 + t)
        benefit = _dense_switch_benefit(adjusted, pred, labels, G, eta)
        largest = np.abs(benefit).max()
        if largest > 0:
            log_w = log_w + eta * benefit / largest
            log_w -= log_w.mean()
    return best_log_w, best_round, best_key[0]


def _dense_cross_fit_halves(labels, n_classes, seed):
    rng = np.random.default_rng(seed)
    first = np.zeros(labels.shape[0], dtype=bool)
    for k in range(n_classes):  # O(n K): one pass over the labels per class
        members = rng.permutation(np.flatnonzero(labels == k))
        first[members[: members.size // 2]] = True
    return first


@pytest.mark.parametrize("reserve", [0.0, 1.0, posthoc._NEAR_RESERVE, 1e6])
@pytest.mark.parametrize("case", range(6))
def test_class_weight_fit_equals_the_dense_computation(case, reserve, monkeypatch):
    # the near-top entries re-chosen every round (reserve 0), sometimes, or never (1e6: every class kept)
    monkeypatch.setattr(posthoc, "_NEAR_RESERVE", reserve)
    n_classes = (10, 40, 120)[case % 3]
    objective_name = ("min_recall", "gmean", "mean_recall")[case % 3]
    train_counts, (logits, labels), _ = _long_tailed(n_classes=n_classes, per_class=12, seed=20 + case)
    if case >= 3:  # coarse logits: many exact ties between classes
        logits = np.round(logits * 2) / 2
    objective = get_objective(objective_name, train_counts=train_counts)
    start = np.zeros(n_classes) if case % 2 else posthoc._fit_logit_adjust(logits, labels, objective,
                                                                              train_counts).offsets
    fast = posthoc._fit_class_weights(logits, labels, copy.deepcopy(objective), start, 60)
    log_w, best_round, value = _dense_class_weights(logits, labels, copy.deepcopy(objective), start, 60)
    assert fast.params["best_round"] == best_round and fast.params["fit_objective"] == value
    assert np.array_equal(fast.offsets, log_w)  # bit for bit: the same sums in the same order


def test_cross_fitted_predictions_equal_the_dense_computation():
    train_counts, (logits, labels), _ = _long_tailed(n_classes=30, per_class=9, seed=31)
    shuffled = np.random.default_rng(1).permutation(labels.size)  # classes interleaved, as in real splits
    logits, labels = logits[shuffled], labels[shuffled]
    objective = get_objective("min_recall", train_counts=train_counts)
    for seed in range(3):
        first = _dense_cross_fit_halves(labels, 30, seed)
        expected = np.empty(labels.size, dtype=np.int64)
        for fit_on, score_on in ((first, ~first), (~first, first)):
            start = posthoc._fit_logit_adjust(logits[fit_on], labels[fit_on], copy.deepcopy(objective),
                                              train_counts).offsets
            log_w, _, _ = _dense_class_weights(logits[fit_on], labels[fit_on], copy.deepcopy(objective), start,
                                               posthoc.CLASS_WEIGHT_ROUNDS)
            expected[score_on] = (logits[score_on] + log_w).argmax(axis=1)
        got = posthoc.cross_fitted_predictions("class_weights", logits, labels, objective,
                                               train_counts=train_counts, n_classes=30, seed=seed)
        assert np.array_equal(got, expected)


@pytest.mark.parametrize("kind", ["logit_adjust", "class_weights"])
def test_cross_fitted_score_is_not_above_the_in_sample_score_on_average(kind):
    gaps = []
    for seed in range(6):
        train_counts, (logits, labels), _ = _long_tailed(per_class=20, seed=10 + seed)
        objective = get_objective("min_recall", train_counts=train_counts)
        fitted = posthoc.fit_correction(kind, logits, labels, objective, train_counts=train_counts)
        in_sample = objective.value(confusion_counts(labels, fitted.apply(logits).argmax(axis=1), 10))
        counts = posthoc.cross_fitted_confusion(
            kind, logits, labels, objective, train_counts=train_counts, n_classes=10, seed=seed
        )
        assert counts.sum() == labels.size  # every sample scored once
        np.testing.assert_array_equal(counts.sum(axis=1), np.bincount(labels, minlength=10))
        gaps.append(objective.value(counts) - in_sample)
    assert np.mean(gaps) <= 0.0


def test_cross_fitting_is_deterministic_given_seed_and_splits_differ_across_seeds():
    train_counts, (logits, labels), _ = _long_tailed(per_class=20, seed=3)
    objective = get_objective("min_recall", train_counts=train_counts)
    runs = [
        posthoc.cross_fitted_confusion(
            "logit_adjust", logits, labels, objective, train_counts=train_counts, n_classes=10, seed=seed
        )
        for seed in (0, 0, 1, 2, 3)
    ]
    assert np.array_equal(runs[0], runs[1])
    assert any(not np.array_equal(runs[0], other) for other in runs[2:])


@pytest.mark.parametrize("kind", ["logit_adjust", "class_weights"])
def test_fit_is_invariant_to_relabelling_classes(kind):
    train_counts, (logits, labels), _ = _long_tailed(per_class=30, seed=6)
    permutation = np.random.default_rng(7).permutation(10)  # new label of old class k is permutation[k]
    inverse = np.argsort(permutation)
    objective = get_objective("gmean", train_counts=train_counts)
    original = posthoc.fit_correction(kind, logits, labels, objective, train_counts=train_counts)
    relabelled = posthoc.fit_correction(
        kind,
        logits[:, inverse],
        permutation[labels],
        get_objective("gmean", train_counts=train_counts[inverse]),
        train_counts=train_counts[inverse],
    )
    np.testing.assert_allclose(relabelled.offsets, original.offsets[inverse], atol=1e-9)


def test_fitting_leaves_the_objective_untouched_and_is_deterministic():
    train_counts, (logits, labels), _ = _long_tailed(seed=8)
    objective = get_objective("min_recall", train_counts=train_counts)
    objective.update(np.eye(10) / 10)
    before = json.dumps(objective.state_dict())
    first = posthoc.fit_correction("class_weights", logits, labels, objective, train_counts=train_counts)
    again = posthoc.fit_correction("class_weights", logits, labels, objective, train_counts=train_counts)
    assert json.dumps(objective.state_dict()) == before
    assert np.array_equal(first.offsets, again.offsets)


@pytest.mark.parametrize("kind", posthoc.KINDS)
def test_params_are_json_and_rebuild_the_correction(kind):
    train_counts, (logits, labels), _ = _long_tailed(seed=9)
    objective = get_objective("min_recall", train_counts=train_counts)
    correction = posthoc.fit_correction(kind, logits, labels, objective, train_counts=train_counts)
    params = json.loads(json.dumps(correction.params))
    assert params["kind"] == kind
    rebuilt = posthoc.Correction.from_params(params)
    assert np.array_equal(rebuilt.apply(logits), correction.apply(logits))


@pytest.mark.parametrize("kind", posthoc.KINDS)
def test_degenerate_inputs_stay_finite(kind):
    rng = np.random.default_rng(0)
    # K = 2, class 1 never predicted by the uncorrected logits
    labels = np.repeat([0, 1], 10)
    logits = np.stack([np.full(20, 5.0), rng.normal(size=20)], axis=1)
    objective = get_objective("min_recall", train_counts=np.array([100, 1]))
    correction = posthoc.fit_correction(kind, logits, labels, objective, train_counts=np.array([100, 1]))
    assert np.all(np.isfinite(correction.offsets))
    counts = posthoc.cross_fitted_confusion(
        kind, logits, labels, objective, train_counts=np.array([100, 1]), n_classes=2
    )
    assert counts.sum() == 20
    # constant logits: every class ties, no scale to step on
    flat = np.zeros((30, 3))
    objective = get_objective("hmean")
    for train_counts in (np.array([5, 3, 1]), None):
        if kind == "logit_adjust" and train_counts is None:
            continue
        correction = posthoc.fit_correction(kind, flat, np.repeat(np.arange(3), 10), objective, train_counts=train_counts)
        assert np.all(np.isfinite(correction.apply(flat)))


def test_errors():
    train_counts, (logits, labels), _ = _long_tailed(seed=0)
    objective = get_objective("min_recall", train_counts=train_counts)
    with pytest.raises(ConfigError, match="Unknown post-hoc correction 'temperature'"):
        posthoc.fit_correction("temperature", logits, labels, objective, train_counts=train_counts)
    with pytest.raises(DataError, match="needs train_counts"):
        posthoc.fit_correction("logit_adjust", logits, labels, objective, train_counts=None)
    with pytest.raises(DataError, match="positive training count"):
        posthoc.fit_correction("logit_adjust", logits, labels, objective, train_counts=np.r_[train_counts[:-1], 0])
    with pytest.raises(DataError, match="labels must be integers"):
        posthoc.fit_correction("none", logits, labels[:-1], objective)
    with pytest.raises(DataError, match="NaN"):
        posthoc.fit_correction("none", np.full_like(logits, np.nan), labels, objective)
    with pytest.raises(DataError, match="n_classes=12"):
        posthoc.cross_fitted_confusion("none", logits, labels, objective, n_classes=12)
    few = np.r_[labels[labels != 3], 3]  # class 3 keeps a single sample
    with pytest.raises(DataError, match="class 3 has 1"):
        posthoc.cross_fitted_confusion(
            "class_weights", logits[: few.size], few, objective, train_counts=train_counts, n_classes=10
        )
    correction = posthoc.fit_correction("none", logits, labels, objective)
    with pytest.raises(DataError, match="fitted for 10 classes"):
        correction.apply(logits[:, :5])
