"""The gain matrix G (K, K): how much one SGD step on a mixup of classes (i, j) raises the objective.

docs/method.md, The gain matrix. One SGD step of cross-entropy on the mixed centroid z_ij = m z_i + (1 - m) z_j, with
m = (lambda_min + 1) / 2 and target t_ij (hard: e_i; soft: m e_i + (1 - m) e_j), moves the logits of
centroid q by dA_q = (t_ij - p_ij) (<z_ij, z_q> [+ 1 with a trained bias]). Through the smooth confusion
C~_kl = pi_k softmax_l(A_k), the objective's surrogate M changes at first order by

    D = dM/dA (K, K),   S = Z Z^T [+ 1],   T = S D,   G_ij = < m T_i + (1 - m) T_j , t_ij - p_ij >.

Everything is a handful of K x K matrix products (no K^3 or K^4 tensor): the mixed softmax factorises as
exp(m A_il + (1 - m) A_jl) = E1_il E2_jl, so its normaliser is E1 E2^T and the contractions with p_ij are
(E1 o T) E2^T and E1 (E2 o T)^T. Rows = label class i, columns = partner class j. All maths in float64.
"""

from __future__ import annotations

import numpy as np

from .checks import is_number
from .errors import ConfigError, DataError, UndefinedMetricError
from .metrics import joint_confusion
from .objectives import Objective, get_objective

__all__ = [
    "gain_matrix",
    "centroid_logits",
    "class_centroids",
    "surrogate_confusion",
    "logit_gradient",
    "GAIN_FORMS",
    "JACOBIANS",
    "TARGETS",
]

GAIN_FORMS = ("exact", "official")
JACOBIANS = ("surrogate", "measured")
TARGETS = ("hard", "soft")

# A mixed-softmax normaliser below this is recomputed row by row with an exact log-sum-exp.
_UNDERFLOW_GUARD = 1e-250


def _finite_matrix(name: str, values, shape: tuple[int | None, ...], shape_text: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != len(shape) or any(
        want is not None and got != want for got, want in zip(array.shape, shape)
    ):
        raise DataError(f"{name} must have shape {shape_text}, but got {array.shape}.")
    if not np.all(np.isfinite(array)):
        raise DataError(f"{name} contains NaN or inf; expected finite values.")
    return array


def class_centroids(features: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Mean feature of each class, shape (K, d), float64.

    Args:
        features: (n, d) features, e.g. of the validation split.
        labels: (n,) integer labels in [0, n_classes).

    Raises:
        UndefinedMetricError: naming every class without a sample.
    """
    features = _finite_matrix("features", features, (None, None), "(n, d)")
    labels = np.asarray(labels)
    if labels.shape != (features.shape[0],):
        raise DataError(
            f"labels must have shape ({features.shape[0]},) to match features, but got {labels.shape}."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise DataError(
            f"labels must lie in [0, {n_classes}), but got values in [{labels.min()}, {labels.max()}]."
        )
    counts = np.bincount(labels, minlength=n_classes)
    missing = np.flatnonzero(counts == 0)
    if missing.size:
        raise UndefinedMetricError(
            f"Cannot compute the centroid of class {', '.join(map(str, missing[:10]))}: it has no sample. "
            "Every class needs at least one sample in the split that defines the centroids."
        )
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    sums = np.add.reduceat(features[order], starts, axis=0)
    return sums / counts[:, None]


def centroid_logits(centroids: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """A = Z W^T + b, shape (K, K), float64: the head's logits at the class centroids (row k = centroid k).

    Args:
        centroids: Z, (K, d). weight: W, (K, d). bias: b, (K,) or None (no bias).
    """
    Z, W, b = _check_head(centroids, weight, bias)
    return _logits(Z, W, b)


def _logits(Z, W, b):
    A = Z @ W.T
    if b is not None:
        A += b
    return A


def surrogate_confusion(logits: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """C~_kl = pi_k softmax_l(A_k), shape (K, K): the smooth confusion the gain differentiates.

    Args:
        logits: A, (K, K), row k = logits at the centroid of class k.
        prior: pi, (K,), the class prior of the measured confusion (its row sums).
    """
    A = np.asarray(logits, dtype=np.float64)
    prior = np.asarray(prior, dtype=np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1] or prior.shape != (A.shape[0],):
        raise DataError(f"logits must be (K, K) and prior (K,), but got {A.shape} and {prior.shape}.")
    probs = np.exp(A - A.max(axis=1, keepdims=True))
    probs *= (prior / probs.sum(axis=1))[:, None]
    return probs


def logit_gradient(C_hat: np.ndarray, metric_grad: np.ndarray) -> np.ndarray:
    """D = dM/dA, shape (K, K): D_km = sum_l dM/dC_kl C^_kl (1[l = m] - C^_km / pi_k).

    Args:
        C_hat: (K, K), the confusion the softmax Jacobian is evaluated at (row sums pi).
        metric_grad: dM/dC at C_hat, (K, K).
    """
    weighted = metric_grad * C_hat  # H_kl = dM/dC_kl C^_kl
    row_total = weighted.sum(axis=1) / C_hat.sum(axis=1)  # sum_l H_kl / pi_k
    weighted -= C_hat * row_total[:, None]
    return weighted


def _check_head(centroids, weight, bias, n_classes: int | None = None):
    Z = _finite_matrix(
        "centroids", centroids, (n_classes, None), "(K, d)" if n_classes is None else f"({n_classes}, d)"
    )
    K, d = Z.shape
    W = _finite_matrix("weight", weight, (K, d), f"({K}, {d}) like the centroids (K, d)")
    b = None if bias is None else _finite_matrix("bias", bias, (K,), f"({K},)")
    return Z, W, b


def _check_options(lambda_min, form, jacobian, target) -> None:
    problems = []
    if not is_number(lambda_min):
        problems.append(f"lambda_min must be a number in [0, 1], but got {lambda_min=}.")
    elif not 0.0 <= lambda_min <= 1.0:
        problems.append(f"lambda_min must be in [0, 1], but got {lambda_min=}.")
    if form not in GAIN_FORMS:
        problems.append(f"form must be one of {', '.join(GAIN_FORMS)}, but got {form=}.")
    if jacobian not in JACOBIANS:
        problems.append(f"jacobian must be one of {', '.join(JACOBIANS)}, but got {jacobian=}.")
    if target not in TARGETS:
        problems.append(f"target must be one of {', '.join(TARGETS)}, but got {target=}.")
    if form == "official" and target == "soft":
        problems.append(
            "form='official' is the released formula for a hard target and is undefined with target='soft'; "
            "use form='exact' with a soft target."
        )
    if problems:
        raise ConfigError(problems, where="gain_matrix arguments")


def gain_matrix(
    confusion: np.ndarray,
    centroids: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    objective: Objective | str,
    *,
    lambda_min: float = 0.6,
    form: str = "exact",
    train_bias: bool = True,
    jacobian: str = "surrogate",
    target: str = "hard",
) -> np.ndarray:
    """The gain G, shape (K, K), float64: G[i, j] = first-order change of the objective's surrogate M
    after one unit SGD step on the mixup of class-i centroid (label) with class-j centroid (partner).

    Args:
        confusion: measured validation confusion (K, K), counts or joint frequencies, rows = true class.
        centroids: Z, (K, d), mean validation feature per class.
        weight: W, (K, d), and bias: b, (K,) or None: the linear head (logits = W z + b).
        objective: an :class:`~selmix_ray.objectives.Objective` whose multipliers are already updated,
            or a name (then built with default parameters and updated on ``confusion``).
        lambda_min: mixing weights lie in [lambda_min, 1]; the gain uses their mean (lambda_min + 1) / 2.
        form: ``"exact"`` (the directional derivative above) or ``"official"`` (the released formula
            G_ij = T_ii - <m T_i + (1 - m) T_j, p_ij> with S = Z Z^T and the measured Jacobian; it
            ignores ``jacobian`` and ``train_bias`` and raises with ``target="soft"``).
        train_bias: whether the SGD step also moves the bias (S gets + 1); ignored when ``bias`` is None.
        jacobian: ``"surrogate"`` (evaluate dM/dC and the softmax Jacobian at C~(A); a class with zero
            measured recall still gets gain) or ``"measured"`` (at the measured confusion).
        target: ``"hard"`` (e_i) or ``"soft"`` (m e_i + (1 - m) e_j).
    """
    _check_options(lambda_min, form, jacobian, target)
    C = joint_confusion(confusion)
    K = C.shape[0]
    Z, W, b = _check_head(centroids, weight, bias, K)
    if isinstance(objective, str):
        objective = get_objective(objective)
        objective.update(C)
    elif not isinstance(objective, Objective):
        raise ConfigError(f"objective must be an Objective or a name, but got {type(objective).__name__}.")
    mix = (float(lambda_min) + 1.0) / 2.0

    A = _logits(Z, W, b)
    if form == "official" or jacobian == "measured":
        C_hat = C
    else:
        C_hat = surrogate_confusion(A, C.sum(axis=1))
    D = logit_gradient(C_hat, objective.grad(C_hat))
    del C_hat
    S = Z @ Z.T
    if form == "exact" and train_bias and b is not None:
        S += 1.0
    T = S @ D
    del S, D

    gain = _mixed_softmax_contraction(A, T, mix)  # <m T_i + (1 - m) T_j, p_ij>
    np.negative(gain, out=gain)
    diag = np.diag(T)
    if form == "official":
        gain += diag[:, None]  # T_ii
    elif target == "hard":
        gain += mix * diag[:, None]  # <m T_i + (1 - m) T_j, e_i> = m T_ii + (1 - m) T_ji
        gain += (1.0 - mix) * T.T
    else:  # soft: m (m T_ii + (1 - m) T_ji) + (1 - m) (m T_ij + (1 - m) T_jj)
        gain += (mix * mix) * diag[:, None]
        gain += ((1.0 - mix) * (1.0 - mix)) * diag[None, :]
        gain += (mix * (1.0 - mix)) * (T + T.T)
    if not np.all(np.isfinite(gain)):
        raise DataError(
            "The gain matrix is not finite: the objective's gradient or the inputs are too large; "
            "check the head's weights and the features for overflow."
        )
    return gain


def _mixed_softmax_contraction(A: np.ndarray, T: np.ndarray, mix: float) -> np.ndarray:
    """X_ij = < m T_i + (1 - m) T_j , softmax(m A_i + (1 - m) A_j) >, shape (K, K), by 4 GEMMs."""
    shifted = A - A.max(axis=1, keepdims=True)
    E1 = np.exp(mix * shifted)
    E2 = np.exp((1.0 - mix) * shifted)
    del shifted
    normaliser = E1 @ E2.T
    scaled = E1 * T
    scaled *= mix
    out = scaled @ E2.T  # sum_l E1_il m T_il E2_jl
    np.multiply(E2, T, out=scaled)
    scaled *= 1.0 - mix
    out += E1 @ scaled.T  # sum_l E1_il (1 - m) T_jl E2_jl
    del scaled, E1, E2
    small = normaliser.min(axis=1) < _UNDERFLOW_GUARD
    with np.errstate(divide="ignore", invalid="ignore"):  # rows with an underflowed normaliser are redone
        out /= normaliser
    for i in np.flatnonzero(small):  # extreme logit gaps: the factorised normaliser underflowed
        out[i] = _mixed_softmax_row(A, T, mix, i)
    return out


def _mixed_softmax_row(A: np.ndarray, T: np.ndarray, mix: float, i: int) -> np.ndarray:
    """Row i of :func:`_mixed_softmax_contraction` by an exact log-sum-exp, shape (K,) over partners j."""
    mixed = mix * A[i][None, :] + (1.0 - mix) * A  # (K partners, K logits)
    probs = np.exp(mixed - mixed.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return mix * (probs @ T[i]) + (1.0 - mix) * np.einsum("jl,jl->j", probs, T)
