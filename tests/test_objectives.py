"""Objectives: gradients vs finite differences, values vs the reported metrics, multipliers, parameters."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from selmix_ray.errors import ConfigError, DataError, SelMixError, UndefinedMetricError
from selmix_ray.metrics import head_mask, metric_values
from selmix_ray.objectives import OBJECTIVES, Objective, get_objective


def mean_log_recall(C):
    """A custom torch objective (monotone in every recall)."""
    import torch

    recall = torch.diagonal(C) / C.sum(dim=1)
    return torch.log(torch.clamp(recall, min=1e-3)).mean()


def make_objective(name: str, **params) -> Objective:
    if name == "custom":
        return get_objective("custom", function=mean_log_recall, **params)
    return get_objective(name, **params)


def random_confusion(rng, K: int, *, floor: float = 0.01) -> np.ndarray:
    """A joint confusion with non-balanced rows, every entry >= floor / K^2 and recalls well above 1e-3."""
    counts = rng.uniform(floor, 1.0, size=(K, K)) + np.diag(rng.uniform(1.0, 3.0, size=K))
    counts *= rng.uniform(0.3, 3.0, size=K)[:, None]
    return counts / counts.sum()


def skewed_coverage_confusion(K: int) -> np.ndarray:
    """Class 0 over-predicted, so the other coverages fall below alpha / K and mu > 0."""
    counts = np.full((K, K), 1.0) + 4.0 * np.eye(K)
    counts[:, 0] += 3.0
    return counts / counts.sum()


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_grad_matches_finite_differences_that_keep_row_sums(name):
    rng = np.random.default_rng(1)
    K = 4
    objective = (
        make_objective(name, omega=5.0)
        if name in ("min_recall", "min_head_tail_recall")
        else make_objective(name)
    )
    objective.update(skewed_coverage_confusion(K))  # non-trivial multipliers (mu > 0 for coverage)
    multipliers = [v for v in objective.state_dict().values() if v is not None]
    if multipliers:
        assert max(map(max, multipliers)) > 1e-3
    C = random_confusion(rng, K)
    grad = objective.grad(C)
    assert grad.shape == (K, K) and grad.dtype == np.float64
    h = 1e-6
    for k in range(K):
        for col in range(K):
            for other in range(K):
                if other == col:
                    continue
                step = np.zeros((K, K))
                step[k, col], step[k, other] = h, -h
                numeric = (objective.surrogate(C + step) - objective.surrogate(C - step)) / (2 * h)
                analytic = grad[k, col] - grad[k, other]
                assert numeric == pytest.approx(analytic, rel=1e-6, abs=1e-8), (k, col, other)


@pytest.mark.parametrize("name", sorted(set(OBJECTIVES) - {"custom"}))
def test_value_is_the_reported_metric(name):
    rng = np.random.default_rng(2)
    K = 5
    counts = rng.integers(0, 20, size=(K, K)) + np.diag(rng.integers(40, 60, size=K))
    objective = make_objective(name, alpha=0.5) if "coverage" in name else make_objective(name)
    C = counts / counts.sum()
    metrics = metric_values(C, head_mask(None, K))
    base = "hmean" if name.startswith("hmean") else ("mean_recall" if "coverage" in name else name)
    assert min(C.sum(axis=0)) >= 0.5 / K  # coverage constraint met: value is the base metric
    assert objective.value(counts) == metrics[base]


@pytest.mark.parametrize("name", ["mean_recall", "gmean", "hmean", "custom"])
def test_surrogate_equals_value_without_multipliers(name):
    C = random_confusion(np.random.default_rng(3), 6)
    objective = make_objective(name)
    assert objective.surrogate(C) == pytest.approx(objective.value(C), rel=1e-12)


def test_coverage_value_ranks_feasible_above_infeasible_hand_worked():
    # K = 2, alpha = 0.95: each coverage must reach 0.475.
    infeasible = np.array([[0.5, 0.0], [0.1, 0.4]])  # recalls (1, 0.8), coverages (0.6, 0.4)
    feasible = np.array([[0.45, 0.05], [0.05, 0.45]])  # recalls (0.9, 0.9), coverages (0.5, 0.5)
    for name in ("mean_recall_min_coverage", "mean_recall_min_head_tail_coverage"):
        objective = get_objective(name)
        assert objective.value(feasible) == pytest.approx(0.9)
        assert objective.value(infeasible) == pytest.approx(0.9 - 1.0 - 2 * (0.475 - 0.4))
    hmean_infeasible = 2 / (1 / 1.0 + 1 / 0.8) - 1.0 - 2 * 0.075
    assert get_objective("hmean_min_coverage").value(infeasible) == pytest.approx(hmean_infeasible)


def test_head_tail_coverage_constrains_the_group_means_only():
    # K = 10: head = classes 0..8, tail = class 9. Class 0 is starved, but the head mean is fine.
    K = 10
    counts = np.eye(K) * 10.0
    counts[0, 0], counts[0, 1] = 0.0, 10.0
    C = counts / counts.sum()
    assert C.sum(axis=0)[0] == 0.0
    per_class = get_objective("mean_recall_min_coverage")
    head_tail = get_objective("mean_recall_min_head_tail_coverage")
    assert head_tail.value(C) == pytest.approx(0.9)
    assert per_class.value(C) == pytest.approx(0.9 - 1.0 - K * 0.95 / K)
    head_tail.update(C)
    assert head_tail.state_dict()["mu"] == [0.0, 0.0]


def test_multiplier_updates_hand_worked():
    C = np.array([[0.4, 0.1], [0.25, 0.25]])  # recalls (0.8, 0.5)
    recall = np.array([0.8, 0.5])
    objective = get_objective("min_recall", omega=2.0, beta=0.5)
    objective.update(C)  # lambda_0 = (1/2, 1/2): the beta term cancels in the normalisation
    first = np.exp(-2.0 * recall) / np.exp(-2.0 * recall).sum()
    assert objective.state_dict()["lambda"] == pytest.approx(first.tolist(), rel=1e-12)
    objective.update(C)
    second = first**0.5 * np.exp(-2.0 * recall)
    assert objective.state_dict()["lambda"] == pytest.approx((second / second.sum()).tolist(), rel=1e-12)
    assert objective.grad(C) == pytest.approx(np.diag(second / second.sum() / 0.5), rel=1e-12)

    coverage = get_objective("mean_recall_min_coverage")  # coverages (0.65, 0.35), target 0.475
    coverage.update(C)
    assert coverage.state_dict()["mu"] == pytest.approx([0.0, 100 * (1 - math.exp(-12.5))], rel=1e-12)

    head_tail = get_objective("min_head_tail_recall", omega=3.0, beta=7.0)  # beta accepted and ignored
    head_tail.update(C)
    expected = np.exp(-3.0 * recall) / np.exp(-3.0 * recall).sum()
    assert head_tail.state_dict()["lambda"] == pytest.approx(expected.tolist(), rel=1e-12)


def test_train_counts_define_head_and_tail():
    C = np.diag([0.1, 0.2, 0.3, 0.4]) + 0.0
    C[0, 1] = 0.1
    C /= C.sum()
    recall = np.diag(C) / C.sum(axis=1)  # class 0 has recall 0.5, the others 1
    by_index = get_objective("min_head_tail_recall")  # tail = class 3
    class0_rare = get_objective("min_head_tail_recall", train_counts=[1, 50, 40, 30])  # tail = class 0
    assert by_index.value(C) == pytest.approx(min(recall[:3].mean(), recall[3]))
    assert class0_rare.value(C) == pytest.approx(recall[0])


def test_zero_recall_gets_the_largest_finite_gradient():
    C = np.array([[0.3, 0.0, 0.0], [0.0, 0.3, 0.0], [0.2, 0.0, 0.2]]) / 1.0
    C[2, 2] = 0.0
    C[2, 1] = 0.2
    C /= C.sum()
    for name in ("gmean", "hmean"):
        grad = get_objective(name).grad(C)
        assert np.all(np.isfinite(grad))
        assert grad[2, 2] > 10 * max(grad[0, 0], grad[1, 1])


def test_state_dict_round_trip_through_json_gives_identical_gradients():
    rng = np.random.default_rng(4)
    for name in (
        "min_recall",
        "min_head_tail_recall",
        "hmean_min_coverage",
        "mean_recall_min_head_tail_coverage",
    ):
        source = (
            get_objective(name, omega=3.0)
            if "recall" in name and "coverage" not in name
            else get_objective(name)
        )
        assert source.state_dict() in ({"lambda": None}, {"mu": None})
        for _ in range(2):
            source.update(skewed_coverage_confusion(5) if "coverage" in name else random_confusion(rng, 5))
        restored = (
            get_objective(name, omega=3.0)
            if "recall" in name and "coverage" not in name
            else get_objective(name)
        )
        restored.load_state_dict(json.loads(json.dumps(source.state_dict())))
        C = random_confusion(rng, 5)
        np.testing.assert_array_equal(restored.grad(C), source.grad(C))
    assert get_objective("gmean").state_dict() == {}
    with pytest.raises(DataError, match="no multipliers"):
        get_objective("gmean").load_state_dict({"lambda": [0.5, 0.5]})
    with pytest.raises(DataError, match="'lambda'"):
        get_objective("min_recall").load_state_dict({"mu": [0.0]})


def test_multipliers_are_kept_for_one_K():
    objective = get_objective("min_recall")
    objective.update(random_confusion(np.random.default_rng(5), 3))
    with pytest.raises(DataError, match=r"need.*\(4,\)"):
        objective.grad(random_confusion(np.random.default_rng(5), 4))


def test_unaccepted_parameter_names_the_accepted_ones():
    with pytest.raises(ConfigError, match="does not accept omega; it accepts eps") as info:
        get_objective("gmean", omega=1.0)
    assert isinstance(info.value, SelMixError)
    with pytest.raises(ConfigError, match="accepts alpha, eps, mu_max, tau"):
        get_objective("hmean_min_coverage", beta=0.5)
    get_objective("min_head_tail_recall", beta=0.5)  # accepted, ignored


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"eps": 0.0}, "eps must be in (0, 1)"),
        ({"omega": -1.0}, "omega must be >= 0"),
        ({"beta": float("nan")}, "beta must be finite"),
        ({"omega": "big"}, "omega must be a number"),
    ],
)
def test_out_of_range_recall_parameters_raise(params, fragment):
    with pytest.raises(ConfigError) as info:
        get_objective("min_recall", **params)
    assert fragment in str(info.value)


def test_every_coverage_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        get_objective("mean_recall_min_coverage", alpha=1.5, tau=0.0, mu_max=-1.0)
    assert len(info.value.problems) == 3
    assert "alpha must be in (0, 1]" in str(info.value) and "tau must be > 0" in str(info.value)


def test_unknown_objective_lists_the_registry():
    with pytest.raises(ConfigError, match="Unknown objective .min_recal.. Available: custom, gmean, hmean"):
        get_objective("min_recal")


def test_custom_objective_from_a_module_string_uses_autograd():
    objective = get_objective("torch:trace")  # value = accuracy; dM/dC = identity
    C = random_confusion(np.random.default_rng(6), 3)
    assert objective.name == "custom"
    assert objective.value(C) == pytest.approx(np.trace(C))
    np.testing.assert_allclose(objective.grad(C), np.eye(3))
    assert objective.state_dict() == {}


def test_custom_objective_errors():
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module_xyz'"):
        get_objective("no_such_module_xyz:f")
    with pytest.raises(ConfigError, match="has no callable 'no_such_function'"):
        get_objective("math:no_such_function")
    with pytest.raises(ConfigError, match="needs function="):
        get_objective("custom")
    with pytest.raises(ConfigError, match="already names a function"):
        get_objective("torch:trace", function=mean_log_recall)
    with pytest.raises(ConfigError, match="accepts eps, function"):
        get_objective("custom", function=mean_log_recall, omega=1.0)
    with pytest.raises(DataError, match="must return a scalar"):
        get_objective("custom", function=lambda C: C).value(np.eye(2))


@pytest.mark.parametrize("method", ["value", "surrogate", "grad", "update"])
def test_bad_confusions_raise(method):
    objective = get_objective("hmean_min_coverage")
    call = getattr(objective, method)
    good = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 2.0], [1.0, 1.0, 5.0]])
    for bad, fragment in [
        (np.where(np.eye(3, dtype=bool), np.nan, good), "NaN or inf"),
        (np.where(np.eye(3, dtype=bool), np.inf, good), "NaN or inf"),
        (good - 2.0 * np.eye(3, k=1), "must be >= 0"),
        (good[:2], "must be square"),
    ]:
        with pytest.raises(DataError, match=fragment):
            call(bad)
    missing = good.copy()
    missing[1] = 0.0
    with pytest.raises(UndefinedMetricError, match="class 1"):
        call(missing)


def test_importing_the_core_maths_does_not_import_torch():
    code = (
        "import sys, selmix_ray.objectives, selmix_ray.gain, selmix_ray.sampling;"
        "bad = [m for m in ('torch', 'ray', 'optuna', 'scipy', 'pyarrow') if m in sys.modules];"
        "sys.exit(str(bad) if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
