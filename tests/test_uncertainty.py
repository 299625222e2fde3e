"""Uncertainty: vectorised values vs objective.value, the bootstrap vs a slow per-image bootstrap, Wilson
intervals vs scipy, coverage on synthetic classifiers with a known truth, paired vs unpaired, verdicts and
selection rules."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import binomtest

from selmix_ray.errors import ConfigError, DataError, UndefinedMetricError
from selmix_ray.metrics import confusion_counts
from selmix_ray.objectives import OBJECTIVES, get_objective
from selmix_ray.uncertainty import (
    bootstrap,
    class_sizes,
    interval,
    intervals,
    recall_intervals,
    replicate_values,
    resample,
    resample_paired,
)
from selmix_ray.verdicts import (
    SELECTION_RULES,
    Comparison,
    compare,
    compare_paired,
    select,
    selection_scores,
    verdict,
)

TRAIN_COUNTS = np.array([500, 300, 200, 90, 40, 20, 10])  # K = 7: head = classes 0-5, tail = class 6


def mean_recall_torch(C):
    """A custom torch objective equal to mean recall."""
    import torch

    return (torch.diagonal(C) / C.sum(dim=1)).mean()


def make_objective(name: str, **params):
    """Objectives for the K = 7 fixtures (head/tail from TRAIN_COUNTS)."""
    if name == "custom":
        return get_objective("custom", function=mean_recall_torch)
    return get_objective(name, train_counts=TRAIN_COUNTS, **params)


def skewed_counts(rng, K: int = 7, n: int = 12) -> np.ndarray:
    """Counts with uneven rows, a few zero entries and class 0 over-predicted, so coverage objectives are
    feasible in some replicates and infeasible in others."""
    P = rng.dirichlet(np.ones(K), size=K) * 0.4 + np.eye(K) * 0.6
    P[:, 0] += 0.08
    P[2, 3] = 0.0
    P /= P.sum(axis=1, keepdims=True)
    sizes = rng.integers(n // 2, 2 * n, size=K)
    return np.stack([rng.multinomial(size, row) for size, row in zip(sizes, P)]).astype(float)


def expand(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image (labels, predictions) arrays with exactly ``counts`` (integer) images."""
    K = counts.shape[0]
    pairs = [(k, col) for k in range(K) for col in range(K) for _ in range(int(counts[k, col]))]
    labels, predictions = (np.array(column) for column in zip(*pairs))
    return labels, predictions


def slow_bootstrap(counts, objective, resamples: int, seed: int, *, scale: int = 1) -> np.ndarray:
    """The reference: resample image indices within each class in a Python loop; ``scale`` draws that many
    times each class's size (a deliberately wrong bootstrap, to show the comparison can fail)."""
    labels, predictions = expand(counts)
    K = counts.shape[0]
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == k) for k in range(K)]
    values = np.empty(resamples)
    for b in range(resamples):
        chosen = np.concatenate([rng.choice(m, size=scale * m.size, replace=True) for m in members])
        values[b] = objective.value(confusion_counts(labels[chosen], predictions[chosen], K))
    return values


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """max |F_a - F_b| over all values; rounded first, so that 1/5 computed two ways is one value."""
    a, b = np.round(a, 10), np.round(b, 10)
    grid = np.union1d(a, b)
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / a.size
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / b.size
    return float(np.max(np.abs(cdf_a - cdf_b)))


def ks_critical(n: int, m: int, alpha: float = 1e-3) -> float:
    """Two-sample Kolmogorov-Smirnov critical value (conservative for discrete distributions)."""
    return float(np.sqrt(-np.log(alpha / 2) / 2) * np.sqrt((n + m) / (n * m)))


# ---------------------------------------------------------------------------------------------------
# Replicates and vectorised values


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_vectorised_value_equals_objective_value_on_every_replicate(name):
    rng = np.random.default_rng(0)
    counts = skewed_counts(rng)
    objective = make_objective(name)
    if "coverage" in name:
        # alpha just below the stored counts' boundary, so replicates fall on both sides of it, by less than
        # the coverage lattice (1 / (n K)), so none falls on it (where rounding could decide the branch)
        coverage = counts.sum(axis=0) / counts.sum()
        if "head_tail" in name:
            head = objective.head(7)
            coverage = np.array([coverage[head].mean(), coverage[~head].mean()])
        objective = make_objective(name, alpha=7 * (coverage.min() - 0.5 / (7 * counts.sum())))
    objective.update(counts)  # multipliers set: value must not depend on them
    replicates = resample(counts, resamples=100 if name == "custom" else 300, seed=1, columns=True, full=True)
    values = replicate_values(objective, replicates)
    reference = np.array([objective.value(confusion) for confusion in replicates.confusions])
    np.testing.assert_allclose(values, reference, rtol=0, atol=1e-12)
    assert np.unique(values).size > 5  # the replicates really differ
    if "coverage" in name:  # both branches of the constrained value occur
        feasible = values > -0.5
        assert 0 < feasible.sum() < values.size


def test_replicates_are_consistent_multinomial_rows():
    rng = np.random.default_rng(2)
    counts = skewed_counts(rng)
    sizes = class_sizes(counts)
    full = resample(counts, resamples=4000, seed=3, columns=True, full=True)
    assert full.confusions.shape == (4000, 7, 7)
    np.testing.assert_array_equal(full.confusions.sum(axis=2), np.broadcast_to(sizes, (4000, 7)))
    np.testing.assert_array_equal(np.diagonal(full.confusions, axis1=1, axis2=2), full.diagonal)
    np.testing.assert_array_equal(full.confusions.sum(axis=1), full.columns)
    assert np.all(full.confusions[:, 2, 3] == 0)  # a zero entry stays zero
    # the mean replicate is the stored counts (multinomial mean n_k p_kl), within Monte-Carlo error
    stderr = np.sqrt(counts * (1 - counts / sizes[:, None]) / 4000) + 1e-9
    assert np.all(np.abs(full.confusions.mean(axis=0) - counts) < 5 * stderr)
    # the diagonal is the same draw whatever else is asked for
    np.testing.assert_array_equal(resample(counts, resamples=4000, seed=3).diagonal, full.diagonal)


def test_custom_objective_loop_matches_the_vectorised_builtin():
    counts = skewed_counts(np.random.default_rng(4))
    custom = bootstrap(counts, make_objective("custom"), resamples=100, seed=5)
    builtin = bootstrap(counts, make_objective("mean_recall"), resamples=100, seed=5)
    np.testing.assert_allclose(custom, builtin, rtol=1e-12)


def test_replicate_values_needs_what_the_objective_reads():
    counts = skewed_counts(np.random.default_rng(4))
    diagonal_only = resample(counts, resamples=10, seed=0)
    with pytest.raises(DataError, match="columns=True"):
        replicate_values(make_objective("mean_recall_min_coverage"), diagonal_only)
    with pytest.raises(DataError, match="full=True"):
        replicate_values(make_objective("custom"), diagonal_only)


# ---------------------------------------------------------------------------------------------------
# Against an independent slow per-image bootstrap


@pytest.mark.parametrize("name", ["min_recall", "hmean", "min_head_tail_recall", "mean_recall_min_coverage"])
def test_bootstrap_distribution_matches_slow_per_image_bootstrap(name):
    counts = skewed_counts(np.random.default_rng(6), n=10)
    objective = make_objective(name, alpha=0.9) if "coverage" in name else make_objective(name)
    B = 3000
    fast = bootstrap(counts, objective, resamples=B, seed=7)
    slow = slow_bootstrap(counts, objective, B, seed=8)
    assert ks_statistic(fast, slow) < ks_critical(B, B)
    step = 1.0 / class_sizes(counts).min()  # one image of the smallest class
    for q in (0.05, 0.5, 0.95):
        assert abs(np.quantile(fast, q) - np.quantile(slow, q)) <= 2 * step + 1e-12, q


def test_slow_comparison_detects_a_wrongly_sized_bootstrap():
    # The same comparison rejects a bootstrap that draws twice each class's images (repeats misread).
    counts = skewed_counts(np.random.default_rng(6), n=10)
    objective = make_objective("mean_recall")
    B = 3000
    fast = bootstrap(counts, objective, resamples=B, seed=7)
    wrong = slow_bootstrap(counts, objective, B, seed=8, scale=2)
    assert ks_statistic(fast, wrong) > ks_critical(B, B)


def test_pooled_repeats_use_the_per_copy_image_count():
    counts = skewed_counts(np.random.default_rng(9))
    objective = make_objective("min_recall")
    pooled = 3 * counts  # three copies that agree on every image, summed
    np.testing.assert_array_equal(class_sizes(pooled, repeats=3), class_sizes(counts))
    np.testing.assert_array_equal(
        bootstrap(pooled, objective, resamples=500, seed=1, repeats=3),
        bootstrap(counts, objective, resamples=500, seed=1),
    )
    assert interval(pooled, objective, seed=1, repeats=3) == interval(counts, objective, seed=1)
    # read as one copy of 3 n_k images, the interval is about sqrt(3) narrower: the mistake repeats= prevents
    smooth = make_objective("mean_recall")
    one, narrow = interval(counts, smooth, seed=1), interval(pooled, smooth, seed=1)
    assert narrow.high - narrow.low < 0.7 * (one.high - one.low)


def test_fractional_counts_are_probabilities_on_the_rounded_image_count():
    counts = np.array([[7.5, 2.5, 0.0], [1.0, 8.4, 0.6], [0.5, 0.5, 19.0]])
    np.testing.assert_array_equal(class_sizes(counts), [10, 10, 20])
    replicates = resample(counts, resamples=20000, seed=0, columns=True)
    assert np.all(replicates.diagonal == np.round(replicates.diagonal))  # whole images
    expected = np.diag(counts) / counts.sum(axis=1) * [10, 10, 20]
    assert np.allclose(replicates.diagonal.mean(axis=0), expected, atol=0.05)


# ---------------------------------------------------------------------------------------------------
# Intervals


def test_interval_is_deterministic_given_the_seed():
    counts = skewed_counts(np.random.default_rng(10))
    objective = make_objective("hmean")
    first = interval(counts, objective, seed=3)
    assert interval(counts, objective, seed=3) == first
    assert interval(counts, objective, seed=4) != first
    assert first.low <= first.point <= first.high
    assert first.point == objective.value(counts)
    assert re.fullmatch(r"\d\.\d{3} \[90%: \d\.\d{3}, \d\.\d{3}\]", str(first))


def test_table_intervals_do_not_depend_on_the_other_trials():
    rng = np.random.default_rng(14)
    first, second, third = (skewed_counts(rng) for _ in range(3))
    objective = make_objective("hmean")
    alone = intervals({"3f2a": first}, objective, seed=5)["3f2a"]
    table = intervals({"0c1d": third, "3f2a": first, "9e8b": second}, objective, seed=5)
    assert table["3f2a"] == alone
    assert table["0c1d"] == intervals({"0c1d": third}, objective, seed=5)["0c1d"]
    twins = intervals({"a": first, "b": first}, objective, seed=5)  # same counts, own streams
    assert twins["a"].point == twins["b"].point and twins["a"] != twins["b"]


def test_basic_interval_reflects_the_percentile_one_about_the_point():
    counts = skewed_counts(np.random.default_rng(11))
    objective = make_objective("mean_recall")
    draws = bootstrap(counts, objective, resamples=1000, seed=2)
    low, high = np.quantile(draws, [0.05, 0.95])
    percentile = interval(counts, objective, method="percentile", seed=2)
    basic = interval(counts, objective, method="basic", seed=2)
    assert (percentile.low, percentile.high) == pytest.approx((low, high), abs=1e-15)
    point = objective.value(counts)
    assert (basic.low, basic.high) == pytest.approx((2 * point - high, 2 * point - low), abs=1e-15)
    assert interval(counts, make_objective("min_recall"), seed=2).method == "basic"  # "auto"
    assert interval(counts, objective, seed=2).method == "percentile"


def test_recall_intervals_are_wilson_intervals():
    counts = np.array([[18, 2, 0], [5, 15, 0], [0, 0, 20]])
    bounds = recall_intervals(counts, level=0.9)
    for k in range(3):
        reference = binomtest(int(counts[k, k]), int(counts[k].sum())).proportion_ci(0.9, method="wilson")
        assert bounds[k] == pytest.approx((reference.low, reference.high), abs=1e-12)
    assert bounds[2, 1] == pytest.approx(1.0) and bounds[2, 0] < 0.9  # recall 1 on 20 images is not certain
    # pooled repeats: the same intervals as one copy
    np.testing.assert_allclose(recall_intervals(4 * counts, repeats=4), bounds)


def test_errors_list_every_problem_and_name_the_empty_class():
    counts = skewed_counts(np.random.default_rng(12))
    objective = make_objective("min_recall")
    with pytest.raises(ConfigError) as error:
        interval(counts, objective, level=1.5, method="bca", kind="both")
    assert len(error.value.problems) == 3
    assert "level=1.5" in str(error.value) and "'percentile'" in str(error.value)
    with pytest.raises(ConfigError, match="resamples=0"):
        resample(counts, resamples=0)
    with pytest.raises(ConfigError, match="seed"):
        interval(counts, objective, seed=-1)
    empty = counts.copy()
    empty[4] = 0
    with pytest.raises(UndefinedMetricError, match="class 4"):
        interval(empty, objective)
    with pytest.raises(DataError, match="shape"):
        compare(counts, counts[:3, :3], objective)


# ---------------------------------------------------------------------------------------------------
# Coverage on synthetic classifiers where the truth is known


def spread_classifier(K: int = 10) -> np.ndarray:
    """(K, K) prediction probabilities: recalls 0.95 .. 0.55, errors spread evenly."""
    recall = np.linspace(0.95, 0.55, K)
    P = ((1 - recall) / (K - 1))[:, None] * (1 - np.eye(K))
    return P + np.diag(recall)


def draw(P, n, rng):
    """(K, K) counts: row k ~ Multinomial(n, P[k])."""
    return rng.multinomial(n, P)


def coverage_run(P, objective, truth, *, n_val, n_test, simulations, method, resamples=400, seed=0):
    """Fractions of simulations whose validation interval covers the truth, and a fresh test value."""
    rng = np.random.default_rng(seed)
    covers_truth = covers_test = predicts_test = 0
    for index in range(simulations):
        val, test = draw(P, n_val, rng), draw(P, n_test, rng)
        test_value = objective.value(test)
        confidence = interval(val, objective, method=method, resamples=resamples, seed=index)
        prediction = interval(val, objective, kind="prediction", new_sizes=np.full(len(P), n_test),
                              resamples=resamples, seed=index)
        covers_truth += confidence.low <= truth <= confidence.high
        covers_test += confidence.low <= test_value <= confidence.high
        predicts_test += prediction.low <= test_value <= prediction.high
    return covers_truth / simulations, covers_test / simulations, predicts_test / simulations


def test_mean_recall_intervals_cover_at_the_nominal_rate():
    P = spread_classifier()
    truth = float(np.mean(np.diag(P)))  # mean recall of the classifier, by hand
    confidence, confidence_on_test, prediction = coverage_run(
        P, get_objective("mean_recall"), truth, n_val=50, n_test=50, simulations=800, method="percentile",
        resamples=250,
    )
    assert 0.85 <= confidence <= 0.94
    assert 0.85 <= prediction <= 0.95
    # a confidence interval is not made for a fresh sample: it covers a same-size test value far less often
    assert confidence_on_test <= prediction - 0.08


def test_min_recall_percentile_interval_fails_on_tied_recalls_and_basic_repairs_it():
    # Ten classes with the same true recall 0.8: the minimum of ten noisy recalls is biased low, so the
    # percentile interval (even lower) almost never covers the truth; the basic interval ("auto") does.
    K = 10
    P = np.full((K, K), 0.2 / (K - 1)) * (1 - np.eye(K)) + np.eye(K) * 0.8
    objective = get_objective("min_recall")
    percentile = coverage_run(P, objective, 0.8, n_val=50, n_test=150, simulations=150, method="percentile")
    basic = coverage_run(P, objective, 0.8, n_val=50, n_test=150, simulations=150, method="auto")
    assert percentile[0] < 0.2
    assert basic[0] > 0.7
    assert basic[2] > 0.8  # the prediction interval for the test value


# ---------------------------------------------------------------------------------------------------
# Trial versus baseline


def slow_paired_differences(labels, trial, baseline, objective, K, resamples, seed):
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == k) for k in range(K)]
    out = np.empty(resamples)
    for b in range(resamples):
        chosen = np.concatenate([rng.choice(m, size=m.size, replace=True) for m in members])
        out[b] = (objective.value(confusion_counts(labels[chosen], trial[chosen], K))
                  - objective.value(confusion_counts(labels[chosen], baseline[chosen], K)))
    return out


def paired_predictions(seed=13, K=5, n=40, flips=8):
    """Labels, a baseline's predictions and a trial that fixes ``flips`` of the baseline's errors."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(K), n)
    baseline = np.where(rng.random(labels.size) < 0.75, labels, rng.integers(0, K, labels.size))
    trial = baseline.copy()
    wrong = np.flatnonzero(trial != labels)
    trial[wrong[:flips]] = labels[wrong[:flips]]
    return labels, trial, baseline


def test_paired_bootstrap_matches_a_slow_paired_loop():
    labels, trial, baseline = paired_predictions()
    objective = get_objective("hmean")
    replicates = resample_paired(labels, {"t": trial, "b": baseline}, n_classes=5, resamples=3000, seed=1)
    fast = replicate_values(objective, replicates["t"]) - replicate_values(objective, replicates["b"])
    slow = slow_paired_differences(labels, trial, baseline, objective, 5, 3000, seed=2)
    assert ks_statistic(fast, slow) < ks_critical(3000, 3000)
    assert np.all(fast >= 0)  # a trial that only fixes errors never loses on the same images


def test_paired_is_narrower_than_unpaired_when_errors_are_shared():
    labels, trial, baseline = paired_predictions()
    objective = get_objective("mean_recall")
    paired = compare_paired(labels, trial, baseline, objective, n_classes=5, seed=0)
    unpaired = compare(confusion_counts(labels, trial, 5), confusion_counts(labels, baseline, 5), objective, seed=0)
    assert paired.paired and not unpaired.paired
    assert paired.difference == pytest.approx(unpaired.difference)
    assert paired.high - paired.low < 0.6 * (unpaired.high - unpaired.low)
    assert paired.prob_better > unpaired.prob_better
    assert verdict(paired).kind == "better"


def test_identical_models_are_indistinguishable():
    labels, trial, _ = paired_predictions()
    objective = get_objective("min_recall")
    same = compare_paired(labels, trial, trial, objective, n_classes=5, seed=0)
    assert (same.difference, same.low, same.high, same.prob_better) == (0.0, 0.0, 0.0, 0.5)
    counts = confusion_counts(labels, trial, 5)
    unpaired = compare(counts, counts, objective, seed=0)
    assert unpaired.low < 0 < unpaired.high and 0.35 < unpaired.prob_better < 0.65
    assert verdict(unpaired).kind == "indistinguishable"


def test_compare_from_counts_finds_a_clear_difference_both_ways():
    K, n = 6, 100
    good = np.full((K, K), 1.0) + np.eye(K) * (0.9 * n - 1)  # recall about 0.9
    bad = np.full((K, K), 7.0) + np.eye(K) * (0.6 * n - 7)  # recall about 0.6
    objective = get_objective("min_recall")
    assert verdict(compare(good, bad, objective)).kind == "better"
    worse = compare(bad, good, objective)
    assert verdict(worse).kind == "worse" and worse.prob_better < 0.01


def test_verdict_false_alarms_and_power_on_synthetic_classifiers():
    # Trial and baseline scored on independent validation draws: when equally good, the 90% verdict says
    # "better" or "worse" about 10% of the time; when its recalls are 0.10 higher (at most 0.99), "better".
    K, n, simulations = 10, 50, 300
    baseline = spread_classifier(K)
    diagonal = np.minimum(np.diag(baseline) + 0.10, 0.99)
    stronger = baseline * ((1 - diagonal) / (1 - np.diag(baseline)))[:, None]
    stronger[np.diag_indices(K)] = diagonal
    objective = get_objective("mean_recall")
    rng = np.random.default_rng(15)
    kinds = {"equal": [], "stronger": []}
    for index in range(simulations):
        for label, trial in (("equal", baseline), ("stronger", stronger)):
            comparison = compare(draw(trial, n, rng), draw(baseline, n, rng), objective, resamples=400, seed=index)
            kinds[label].append(verdict(comparison).kind)
    false_alarms = np.mean([kind != "indistinguishable" for kind in kinds["equal"]])
    assert 0.04 <= false_alarms <= 0.17
    assert np.mean([kind == "better" for kind in kinds["stronger"]]) >= 0.9
    assert "worse" not in kinds["stronger"]


def test_verdict_sentence_states_the_numbers():
    comparison = Comparison(trial=0.761, baseline=0.702, difference=0.059, low=0.021, high=0.098,
                            prob_better=0.981, level=0.9, method="percentile", resamples=1000, paired=False)
    text = str(verdict(comparison, trial="best trial 3f2a", baseline="post-hoc class weights",
                       objective="min_recall"))
    assert text == (
        "best trial 3f2a is better than post-hoc class weights beyond noise: min_recall 0.76 vs 0.70, "
        "difference +0.06 [90%: +0.02, +0.10], P(better) = 0.98 (validation, 1000 unpaired resamples)"
    )
    level = Comparison.from_draws(0.70, 0.70, np.linspace(-0.1, 0.1, 1001), np.zeros(1001))
    assert verdict(level).kind == "indistinguishable"
    assert "is indistinguishable from the best baseline within noise" in str(verdict(level))
    assert level.prob_better == pytest.approx(0.5)
    # under the basic method P(better) reads the reflected differences, consistent with the interval
    skewed = Comparison.from_draws(0.70, 0.66, np.linspace(-0.02, 0.03, 1001), np.zeros(1001), method="basic")
    assert skewed.low == pytest.approx(2 * 0.04 - (-0.02 + 0.05 * 0.95))  # 2 d - q95
    assert skewed.prob_better == 1.0 and verdict(skewed).kind == "better"
    raw = Comparison.from_draws(0.70, 0.66, np.linspace(-0.02, 0.03, 1001), np.zeros(1001))
    assert raw.prob_better == pytest.approx(0.6, abs=1e-3) and verdict(raw).kind == "indistinguishable"


# ---------------------------------------------------------------------------------------------------
# Selection rules


def test_selection_rules():
    K = 5
    objective = get_objective("min_recall")
    lucky = np.eye(K) * 8 + (1 - np.eye(K)) * 0.5  # recall 0.8 on 10 images per class
    steady = np.eye(K) * 780 + (1 - np.eye(K)) * 55  # recall 0.78 on 1000 images per class
    candidates = {"lucky": lucky, "steady": steady}
    assert select(candidates, objective, rule="max") == "lucky"
    assert select(candidates, objective, rule="lcb") == "steady"
    scores = selection_scores(candidates, objective, rule="lcb")
    assert scores["lucky"] < 0.8 and scores["steady"] < 0.78  # lower bounds below the point values
    assert scores == selection_scores(candidates, objective, rule="lcb")  # deterministic
    assert SELECTION_RULES == ("max", "lcb")
    with pytest.raises(ConfigError, match="rule"):
        select(candidates, objective, rule="best")



def test_import_loads_numpy_only():
    code = (
        "import json, sys\n"
        "import selmix_ray.uncertainty\n"
        "heavy = ('torch', 'ray', 'optuna', 'pandas', 'scipy', 'matplotlib')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
