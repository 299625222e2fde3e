"""Gain matrix: finite differences, a slow loop reference, hand-worked values and one invariance suite."""

from __future__ import annotations

import numpy as np
import pytest

from selmix_ray.errors import ConfigError, DataError, SelMixError, UndefinedMetricError
from selmix_ray.gain import (
    centroid_logits,
    class_centroids,
    gain_matrix,
    logit_gradient,
    surrogate_confusion,
)
from selmix_ray.objectives import OBJECTIVES, get_objective


def mean_log_recall(C):
    """A custom torch objective (monotone in every recall)."""
    import torch

    recall = torch.diagonal(C) / C.sum(dim=1)
    return torch.log(torch.clamp(recall, min=1e-3)).mean()


def make_objective(name, **params):
    if name == "custom":
        return get_objective("custom", function=mean_log_recall, **params)
    return get_objective(name, **params)


def softmax_rows(A):
    E = np.exp(A - A.max(axis=1, keepdims=True))
    return E / E.sum(axis=1, keepdims=True)


def problem(seed=0, K=4, d=6):
    """Centroids, a head with bias, and a measured confusion with non-balanced priors that differs from C~."""
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(K, d)) / np.sqrt(d) + np.eye(K, d)
    W = rng.normal(size=(K, d)) * 0.8 + np.eye(K, d)
    b = rng.normal(size=K) * 0.3
    counts = rng.integers(1, 8, size=(K, K)) + np.diag(rng.integers(5, 15, size=K))
    counts = counts * rng.integers(1, 5, size=K)[:, None]  # rows of different sizes
    return counts.astype(float), Z, W, b


def updated_objective(name, counts, **params):
    objective = make_objective(name, **params)
    if "coverage" in name:  # make the coverage multipliers non-zero
        skewed = counts.copy()
        skewed[:, 0] += counts.sum() / len(counts)
        objective.update(skewed)
    else:
        objective.update(counts)
    return objective


def loop_gain(counts, Z, W, b, objective, *, lambda_min, form, train_bias, jacobian, target):
    """The gain, one pair at a time, straight from the definition (docs/method.md, The gain matrix)."""
    K = len(counts)
    C = counts / counts.sum()
    prior = C.sum(axis=1)
    bias = np.zeros(K) if b is None else b
    mix = (lambda_min + 1) / 2
    A = np.array([[W[m] @ Z[k] + bias[m] for m in range(K)] for k in range(K)])
    C_hat = C if (form == "official" or jacobian == "measured") else prior[:, None] * softmax_rows(A)
    dM = objective.grad(C_hat)
    D = np.zeros((K, K))
    for k in range(K):
        for m in range(K):
            D[k, m] = sum(
                dM[k, col] * C_hat[k, col] * ((col == m) - C_hat[k, m] / prior[k]) for col in range(K)
            )
    G = np.zeros((K, K))
    for i in range(K):
        for j in range(K):
            z_mix = mix * Z[i] + (1 - mix) * Z[j]
            p = softmax_rows((W @ z_mix + bias)[None])[0]
            t = np.eye(K)[i] if target == "hard" else mix * np.eye(K)[i] + (1 - mix) * np.eye(K)[j]
            for q in range(K):
                if form == "official":
                    dA = np.eye(K)[i] * (Z[i] @ Z[q]) - p * (z_mix @ Z[q])
                else:
                    dA = (t - p) * (z_mix @ Z[q] + (1.0 if train_bias and b is not None else 0.0))
                G[i, j] += D[q] @ dA
    return G


def surrogate_after_step(objective, Z, W, b, prior, i, j, h, *, mix, target):
    """M(C~(W + h dW, b + h db)) after a step of size h along the (i, j) SGD direction."""
    K = len(prior)
    z_mix = mix * Z[i] + (1 - mix) * Z[j]
    p = softmax_rows((W @ z_mix + b)[None])[0]
    t = np.eye(K)[i] if target == "hard" else mix * np.eye(K)[i] + (1 - mix) * np.eye(K)[j]
    W_step = W + h * np.outer(t - p, z_mix)
    b_step = b + h * (t - p)
    C_tilde = prior[:, None] * softmax_rows(Z @ W_step.T + b_step)
    return objective.surrogate(C_tilde)


@pytest.mark.parametrize("target", ["hard", "soft"])
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_exact_gain_is_the_directional_derivative(name, target):
    counts, Z, W, b = problem(seed=1)
    objective = updated_objective(name, counts)
    G = gain_matrix(counts, Z, W, b, objective, lambda_min=0.5, target=target)
    prior = counts.sum(axis=1) / counts.sum()
    C_tilde = surrogate_confusion(centroid_logits(Z, W, b), prior)
    assert np.abs(C_tilde - counts / counts.sum()).max() > 0.05  # measured C differs from C~
    h = 1e-5
    for i in range(len(counts)):
        for j in range(len(counts)):
            plus = surrogate_after_step(objective, Z, W, b, prior, i, j, h, mix=0.75, target=target)
            minus = surrogate_after_step(objective, Z, W, b, prior, i, j, -h, mix=0.75, target=target)
            assert G[i, j] == pytest.approx((plus - minus) / (2 * h), rel=1e-6, abs=1e-9), (i, j)


CONFIGURATIONS = [
    dict(form="exact", target="hard", jacobian="surrogate", train_bias=True, bias=True),
    dict(form="exact", target="soft", jacobian="surrogate", train_bias=True, bias=True),
    dict(form="exact", target="hard", jacobian="measured", train_bias=True, bias=True),
    dict(form="exact", target="soft", jacobian="measured", train_bias=False, bias=True),
    dict(form="exact", target="hard", jacobian="surrogate", train_bias=False, bias=True),
    dict(form="exact", target="hard", jacobian="surrogate", train_bias=True, bias=False),
    dict(form="official", target="hard", jacobian="surrogate", train_bias=True, bias=True),
    dict(form="official", target="hard", jacobian="measured", train_bias=False, bias=False),
]


@pytest.mark.parametrize("name", ["min_recall", "hmean_min_head_tail_coverage"])
@pytest.mark.parametrize("config", CONFIGURATIONS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_both_forms_match_the_slow_loop_version(config, name):
    counts, Z, W, b = problem(seed=2, K=5, d=7)
    config = dict(config)
    bias = b if config.pop("bias") else None
    objective = updated_objective(name, counts)
    G = gain_matrix(counts, Z, W, bias, objective, lambda_min=0.6, **config)
    reference = loop_gain(counts, Z, W, bias, objective, lambda_min=0.6, **config)
    np.testing.assert_allclose(G, reference, rtol=0, atol=1e-10 * np.abs(reference).max())
    assert np.abs(reference).max() > 1e-3


def test_extreme_logits_fall_back_to_an_exact_log_sum_exp():
    counts, Z, _, _ = problem(seed=3, K=5, d=5)
    Z = np.eye(5)
    W = np.random.default_rng(3).normal(size=(5, 5)) * 5000.0  # logit gaps of thousands
    shifted = (Z @ W.T) - (Z @ W.T).max(axis=1, keepdims=True)
    assert (np.exp(0.8 * shifted) @ np.exp(0.2 * shifted).T).min() < 1e-250  # factorisation underflows
    objective = updated_objective("min_recall", counts)
    options = dict(lambda_min=0.6, form="exact", train_bias=True, jacobian="measured", target="hard")
    G = gain_matrix(counts, Z, W, None, objective, **options)
    reference = loop_gain(counts, Z, W, None, objective, **options)
    assert np.all(np.isfinite(G))
    np.testing.assert_allclose(G, reference, rtol=0, atol=1e-10 * np.abs(reference).max())


def test_hand_worked_uniform_head_K3():
    # Z = I, W = 0, b = 0: every softmax is uniform. Balanced prior, mean recall, surrogate Jacobian:
    # C^ = 1/9, dM/dC = I, D = (I - J/3) / 9, S = I + J, T = S D = (I - J/3) / 9, <T_x, 1> = 0, so
    # G_ij = m T_ii + (1 - m) T_ji = (m 2/3 + (1 - m)(1[i = j] - 1/3)) / 9 with m = 0.8.
    counts = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 0.0], [1.0, 1.0, 1.0]])
    G = gain_matrix(counts, np.eye(3), np.zeros((3, 3)), np.zeros(3), "mean_recall", lambda_min=0.6)
    expected = np.full((3, 3), 1.4 / 27)
    np.fill_diagonal(expected, 2 / 27)
    np.testing.assert_allclose(G, expected, rtol=1e-12)


def test_hand_worked_official_K3():
    # Same head, measured Jacobian at C = counts / 9: D row 0 = (6, -6, 0)/81, row 1 = 0 (recall 1),
    # row 2 = (-3, -3, 6)/81; S = I so T = D; rows of T sum to 0, so G_ij = T_ii.
    counts = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 0.0], [1.0, 1.0, 1.0]])
    G = gain_matrix(counts, np.eye(3), np.zeros((3, 3)), np.zeros(3), "mean_recall", form="official")
    expected = np.array([[6.0] * 3, [0.0] * 3, [6.0] * 3]) / 81
    np.testing.assert_allclose(G, expected, rtol=1e-12, atol=1e-15)


def test_objective_by_name_is_built_and_updated_on_the_measured_confusion():
    counts, Z, W, b = problem(seed=4)
    objective = get_objective("min_recall")
    objective.update(counts)
    np.testing.assert_array_equal(
        gain_matrix(counts, Z, W, b, "min_recall"), gain_matrix(counts, Z, W, b, objective)
    )


def test_class_centroids_and_logits():
    rng = np.random.default_rng(5)
    features, labels = rng.normal(size=(40, 3)), rng.permutation(np.arange(40) % 4)
    centroids = class_centroids(features, labels, 4)
    for k in range(4):
        np.testing.assert_allclose(centroids[k], features[labels == k].mean(axis=0))
    W, b = rng.normal(size=(4, 3)), rng.normal(size=4)
    np.testing.assert_allclose(centroid_logits(centroids, W, b), centroids @ W.T + b)
    with pytest.raises(UndefinedMetricError, match="class 4"):
        class_centroids(features, labels, 5)


# ---------------------------------------------------------------------------------------------------
# One invariance suite over every objective in the registry


def invariance_problem(K=5, d=8, seed=6):
    rng = np.random.default_rng(seed)
    Z = 2.0 * np.eye(K, d) + 0.2 * rng.normal(size=(K, d))  # nearly orthogonal centroids
    W = 0.5 * rng.normal(size=(K, d)) + np.eye(K, d)
    b = 0.1 * rng.normal(size=K)
    counts = rng.integers(1, 6, size=(K, K)) + np.diag(rng.integers(10, 20, size=K))
    counts = (counts * rng.integers(1, 4, size=K)[:, None]).astype(float)
    train_counts = np.array([50.0, 31.0, 20.0, 12.0, 7.0])[:K]
    return counts, Z, W, b, train_counts


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
class TestInvariances:
    def test_relabelling_classes_permutes_the_gain(self, name):
        counts, Z, W, b, train_counts = invariance_problem()
        order = np.array([3, 0, 4, 2, 1])  # new class a is old class order[a]
        gains = []
        for perm in (np.arange(5), order):
            objective = make_objective(name, train_counts=train_counts[perm])
            C = counts[np.ix_(perm, perm)]
            objective.update(C)
            gains.append(gain_matrix(C, Z[perm], W[perm], b[perm], objective, target="soft"))
        np.testing.assert_allclose(gains[1], gains[0][np.ix_(order, order)], rtol=1e-10, atol=1e-14)

    def test_perfect_classifier(self, name):
        _, Z, W, b, train_counts = invariance_problem()
        counts = np.diag([20.0, 20.0, 20.0, 20.0, 20.0])
        objective = make_objective(name, train_counts=train_counts)
        objective.update(counts)
        if name != "custom":
            assert objective.value(counts) == 1.0
        measured = gain_matrix(counts, Z, W, b, objective, jacobian="measured")
        np.testing.assert_allclose(measured, 0.0, atol=1e-12)  # one-hot rows: the softmax Jacobian vanishes
        assert np.all(np.isfinite(gain_matrix(counts, Z, W, b, objective)))

    def test_zero_recall_class_still_gets_gain_under_the_default_jacobian(self, name):
        counts, Z, W, b, train_counts = invariance_problem()
        tail = 4  # the rarest class in training, never predicted: zero recall, zero coverage
        counts[:, tail] = 0.0
        counts[tail, 0] = 15.0
        b = b.copy()
        b[tail] -= 3.0  # the head rarely predicts it, as the measured confusion says
        objective = make_objective(name, train_counts=train_counts)
        objective.update(counts)
        C = counts / counts.sum()
        metric_grad = objective.grad(C)
        if np.array_equal(metric_grad, np.diag(np.diag(metric_grad))):  # recall-only: no coverage terms
            np.testing.assert_array_equal(logit_gradient(C, metric_grad)[tail], 0.0)  # no signal at C
        G = gain_matrix(counts, Z, W, b, objective)
        assert G[tail, tail] > 0.01 * np.abs(G).max()

    def test_class_without_validation_samples_is_named(self, name):
        counts, Z, W, b, train_counts = invariance_problem()
        counts[3] = 0.0
        objective = make_objective(name, train_counts=train_counts)
        with pytest.raises(UndefinedMetricError, match="class 3"):
            gain_matrix(counts, Z, W, b, objective)
        with pytest.raises(UndefinedMetricError, match="class 3"):
            objective.value(counts)

    def test_bad_shapes_and_arguments_raise_clear_errors(self, name):
        counts, Z, W, b, train_counts = invariance_problem()
        objective = make_objective(name, train_counts=train_counts)
        cases = [
            (dict(centroids=Z[:4]), DataError, r"centroids must have shape \(5, d\), but got \(4, 8\)"),
            (dict(weight=W[:, :7]), DataError, r"weight must have shape \(5, 8\)"),
            (dict(bias=b[:3]), DataError, r"bias must have shape \(5,\), but got \(3,\)"),
            (dict(confusion=counts[:, :4]), DataError, "must be square"),
            (dict(lambda_min=1.5), ConfigError, "lambda_min must be in"),
            (dict(form="released"), ConfigError, "form must be one of exact, official"),
            (dict(jacobian="true"), ConfigError, "jacobian must be one of surrogate, measured"),
            (dict(target="mixed"), ConfigError, "target must be one of hard, soft"),
            (dict(form="official", target="soft"), ConfigError, "undefined with target='soft'"),
            (dict(objective=3), ConfigError, "objective must be an Objective or a name"),
            (dict(objective="nope"), ConfigError, "Unknown objective 'nope'"),
        ]
        for override, error, fragment in cases:
            arguments = dict(confusion=counts, centroids=Z, weight=W, bias=b, objective=objective)
            arguments.update(override)
            with pytest.raises(error, match=fragment) as info:
                gain_matrix(**arguments)
            assert isinstance(info.value, SelMixError)

    def test_nan_inf_and_negative_inputs_raise(self, name):
        counts, Z, W, b, train_counts = invariance_problem()
        objective = make_objective(name, train_counts=train_counts)
        for value in (np.nan, np.inf, -1.0):
            bad = counts.copy()
            bad[1, 2] = value
            with pytest.raises(DataError, match="NaN or inf|must be >= 0"):
                gain_matrix(bad, Z, W, b, objective)
        for key, array in (("centroids", Z), ("weight", W), ("bias", b)):
            bad = array.copy()
            bad.flat[0] = np.nan
            arguments = dict(confusion=counts, centroids=Z, weight=W, bias=b, objective=objective)
            arguments[key] = bad
            with pytest.raises(DataError, match=f"{key} contains NaN or inf"):
                gain_matrix(**arguments)
