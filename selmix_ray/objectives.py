"""Objectives: the metric a sweep optimises, its multiplier-weighted surrogate and that surrogate's gradient.

Every objective works on the joint confusion C, shape (K, K), rows = true class, columns = predicted
class, summing to 1 (counts are accepted and normalised). With prior pi_k = sum_l C_kl and recall
r_k = C_kk / pi_k (docs/method.md, Notation and Objectives):

- ``value(C)``: the true metric, computed by :func:`selmix_ray.metrics.metric_values`, the same function
  that produces the reported metrics (no floor);
- ``surrogate(C)``: the multiplier-weighted form M (equal to ``value`` where there are no multipliers and
  every recall is at least ``eps``);
- ``grad(C)``: dM/dC, shape (K, K), treating pi as constant; recalls that enter non-linearly (G-mean,
  H-mean) are floored at ``eps`` so that a zero recall pushes hardest instead of giving inf;
- ``update(C)``: refreshes the multipliers, once per gain refresh, before ``grad``;
- ``state_dict()`` / ``load_state_dict(d)``: the multipliers as plain lists, for an exact resume.

Multipliers are created lazily when K is first seen. ``get_objective(name, *, train_counts, **params)``
builds one from the :data:`OBJECTIVES` registry; a name containing ``":"`` is a custom torch function.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import ClassVar

import numpy as np

from .checks import is_number
from .errors import ConfigError, DataError
from .metrics import head_mask, joint_confusion, metric_values

__all__ = [
    "Objective",
    "OBJECTIVES",
    "get_objective",
    "MeanRecall",
    "MinRecall",
    "MinHeadTailRecall",
    "GMean",
    "HMean",
    "MeanRecallMinCoverage",
    "HMeanMinCoverage",
    "MeanRecallMinHeadTailCoverage",
    "HMeanMinHeadTailCoverage",
    "CustomObjective",
]

DEFAULT_EPS = 1e-3  # recall floor in surrogate and grad


# Every numeric parameter an objective may accept: (test of its value, the rule in words).
_PARAM_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "eps": (lambda v: 0 < v < 1, "in (0, 1)"),
    "omega": (lambda v: v >= 0, ">= 0"),
    "beta": (lambda v: v >= 0, ">= 0"),
    "alpha": (lambda v: 0 < v <= 1, "in (0, 1] (each constrained coverage must reach alpha/K, and K coverages "
                                    "sum to 1)"),
    "tau": (lambda v: v > 0, "> 0"),
    "mu_max": (lambda v: v >= 0, ">= 0"),
}


def _validate_train_counts(train_counts) -> np.ndarray | None:
    if train_counts is None:
        return None
    counts = np.asarray(train_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size < 2:
        raise DataError(
            f"train_counts must be 1-D with one count per class (K >= 2), but got shape {counts.shape}."
        )
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise DataError(f"train_counts must be finite and >= 0, but got {counts.tolist()!r}.")
    return counts


class Objective:
    """Base class: one metric, its surrogate M and dM/dC. Subclasses set ``name`` and ``defaults``.

    Args:
        train_counts: (K,) training counts that order classes into head and tail (None: class index
            order, class 0 most frequent). Only objectives that use head/tail look at it.
        **params: the objective's parameters (``defaults`` lists them); see :func:`get_objective`.
    """

    name: ClassVar[str] = "objective"
    defaults: ClassVar[dict[str, float]] = {"eps": DEFAULT_EPS}
    ignored: ClassVar[tuple[str, ...]] = ()  # accepted for uniformity, without effect
    extra: ClassVar[tuple[str, ...]] = ()  # non-numeric keyword arguments of the subclass

    def __init__(self, *, train_counts=None, **params):
        accepted = sorted(set(self.defaults) | set(self.ignored) | set(self.extra))
        problems = []
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            problems.append(
                f"objective {self.name!r} does not accept {', '.join(unknown)}; "
                f"it accepts {', '.join(accepted) or 'no parameter'}."
            )
        values = dict(self.defaults)
        for key, value in params.items():
            if key not in self.defaults:
                continue
            if not is_number(value):
                problems.append(f"{key} must be a number, but got {key}={value!r}.")
                continue
            if not math.isfinite(value):
                problems.append(f"{key} must be finite, but got {key}={value!r}.")
                continue
            values[key] = float(value)
        for key, value in values.items():
            in_range, rule = _PARAM_RANGES[key]
            if isinstance(value, float) and not in_range(value):
                problems.append(f"{key} must be {rule}, but got {key}={value!r}.")
        if problems:
            raise ConfigError(problems, where=f"objective {self.name!r}")
        self.params: dict[str, float] = values
        self.train_counts = _validate_train_counts(train_counts)
        self._head: np.ndarray | None = None

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.params.items())
        return f"{type(self).__name__}({args})"

    # -- public API ---------------------------------------------------------------------------------

    def value(self, C: np.ndarray) -> float:
        """The true metric of C (K, K): the number reported as ``objective`` and ranked by a sweep."""
        C = joint_confusion(C)
        return float(self._value(C, metric_values(C, self.head(C.shape[0]))))

    def surrogate(self, C: np.ndarray) -> float:
        """M(C): the multiplier-weighted surrogate whose gradient :meth:`grad` returns."""
        C, prior, recall = self._prepare(C)
        return float(self._surrogate(C, prior, recall))

    def grad(self, C: np.ndarray) -> np.ndarray:
        """dM/dC at C, shape (K, K), float64, treating the prior pi (row sums) as constant."""
        C, prior, recall = self._prepare(C)
        return self._grad(C, prior, recall)

    def update(self, C: np.ndarray) -> None:
        """Refresh the multipliers from the measured confusion C (K, K); a no-op without multipliers."""
        C, prior, recall = self._prepare(C)
        self._update(C, prior, recall)

    def state_dict(self) -> dict:
        """The multipliers as plain lists (JSON- and pickle-able); empty without multipliers."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore the multipliers saved by :meth:`state_dict`."""
        if state:
            raise DataError(
                f"Objective {self.name!r} has no multipliers, but the state to load has keys {sorted(state)}."
            )

    def head(self, n_classes: int) -> np.ndarray:
        """Boolean (K,): True for head classes (docs/method.md, Notation), cached per K."""
        if self._head is None or self._head.shape[0] != n_classes:
            self._head = head_mask(self.train_counts, n_classes)
        return self._head

    # -- what a subclass provides -------------------------------------------------------------------

    def _value(self, C: np.ndarray, metrics: dict[str, float]) -> float:
        return metrics[self.name]

    def _surrogate(self, C, prior, recall) -> float:
        raise NotImplementedError

    def _grad(self, C, prior, recall) -> np.ndarray:
        raise NotImplementedError

    def _update(self, C, prior, recall) -> None:
        pass

    def _init_multipliers(self, n_classes: int) -> None:
        pass

    # -- helpers ------------------------------------------------------------------------------------

    def _prepare(self, C):
        C = joint_confusion(C)
        self._init_multipliers(C.shape[0])
        prior = C.sum(axis=1)
        recall = np.diag(C) / prior
        return C, prior, recall

    def _floored(self, recall: np.ndarray) -> np.ndarray:
        return np.maximum(recall, self.params["eps"])


def _diagonal(values: np.ndarray) -> np.ndarray:
    """A (K, K) float64 matrix with ``values`` (K,) on the diagonal."""
    return np.diag(values.astype(np.float64, copy=False))


def _check_multiplier_size(name: str, multipliers: np.ndarray, expected: int) -> None:
    if multipliers.shape != (expected,):
        raise DataError(
            f"The {name} multipliers have shape {multipliers.shape}, but this confusion needs ({expected},): "
            "an objective keeps its multipliers for one K; build a new objective for a different K."
        )


def _checked_array(state: dict, key: str, owner: str) -> np.ndarray | None:
    if set(state) != {key}:
        raise DataError(
            f"Objective {owner!r} expects a state with the key {key!r}, but got keys {sorted(state)}."
        )
    if state[key] is None:
        return None
    values = np.asarray(state[key], dtype=np.float64)
    if values.ndim != 1 or not np.all(np.isfinite(values)):
        raise DataError(f"The {key!r} multipliers must be a finite 1-D list, but got {state[key]!r}.")
    return values


class _Multiplied(Objective):
    """An objective with multipliers (K,) or (2,), created at the first K seen and saved under ``state_key``."""

    state_key: ClassVar[str] = "lambda"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.multipliers: np.ndarray | None = None

    def state_dict(self):
        return {self.state_key: None if self.multipliers is None else self.multipliers.tolist()}

    def load_state_dict(self, state):
        self.multipliers = _checked_array(state, self.state_key, self.name)


# ---------------------------------------------------------------------------------------------------
# Recall objectives


class MeanRecall(Objective):
    """Mean recall (1/K) sum_k r_k. dM/dC_kk = 1 / (K pi_k)."""

    name = "mean_recall"

    def _surrogate(self, C, prior, recall):
        return recall.mean()

    def _grad(self, C, prior, recall):
        return _diagonal(1.0 / (len(prior) * prior))


class MinRecall(_Multiplied):
    """Worst-class recall, through M = sum_k lambda_k r_k with lambda on the simplex.

    Update: lambda <- normalise(lambda^beta * exp(-omega r)), lambda_0 = 1/K.
    """

    name = "min_recall"
    defaults = {"eps": DEFAULT_EPS, "omega": 50.0, "beta": 0.0}  # multipliers: lambda, (K,)

    def _init_multipliers(self, n_classes):
        if self.multipliers is None:
            self.multipliers = np.full(n_classes, 1.0 / n_classes)
        _check_multiplier_size("lambda", self.multipliers, n_classes)

    def _surrogate(self, C, prior, recall):
        return float(self.multipliers @ recall)

    def _grad(self, C, prior, recall):
        return _diagonal(self.multipliers / prior)

    def _update(self, C, prior, recall):
        log_weights = -self.params["omega"] * recall
        if self.params["beta"] != 0.0:
            tiny = np.finfo(np.float64).tiny
            log_weights = log_weights + self.params["beta"] * np.log(np.maximum(self.multipliers, tiny))
        weights = np.exp(log_weights - log_weights.max())
        self.multipliers = weights / weights.sum()


class MinHeadTailRecall(_Multiplied):
    """min(mean head recall, mean tail recall), through M = lambda_h mean_head(r) + lambda_t mean_tail(r).

    Update: (lambda_h, lambda_t) = softmax(-omega [mean_head r, mean_tail r]) (no memory: beta is ignored).
    """

    name = "min_head_tail_recall"
    defaults = {"eps": DEFAULT_EPS, "omega": 50.0}
    ignored = ("beta",)  # multipliers: (lambda_head, lambda_tail)

    def _init_multipliers(self, n_classes):
        if self.multipliers is None:
            self.multipliers = np.array([0.5, 0.5])
        _check_multiplier_size("(lambda_head, lambda_tail)", self.multipliers, 2)

    def _group_means(self, recall):
        head = self.head(len(recall))
        return np.array([recall[head].mean(), recall[~head].mean()])

    def _surrogate(self, C, prior, recall):
        return float(self.multipliers @ self._group_means(recall))

    def _grad(self, C, prior, recall):
        head = self.head(len(prior))
        weight = np.where(head, self.multipliers[0] / head.sum(), self.multipliers[1] / (~head).sum())
        return _diagonal(weight / prior)

    def _update(self, C, prior, recall):
        log_weights = -self.params["omega"] * self._group_means(recall)
        weights = np.exp(log_weights - log_weights.max())
        self.multipliers = weights / weights.sum()


def _gmean_and_diag_grad(prior, floored):
    """G-mean of floored recalls and its diagonal gradient M / (K r_k pi_k)."""
    value = math.exp(np.mean(np.log(floored)))
    return value, value / (len(prior) * floored * prior)


def _hmean_and_diag_grad(prior, floored):
    """H-mean of floored recalls and its diagonal gradient M^2 / (K r_k^2 pi_k)."""
    value = len(prior) / np.sum(1.0 / floored)
    return value, value**2 / (len(prior) * floored**2 * prior)


class GMean(Objective):
    """Geometric mean of recalls (prod r_k)^(1/K); recalls floored at eps in surrogate and grad."""

    name = "gmean"

    def _surrogate(self, C, prior, recall):
        return _gmean_and_diag_grad(prior, self._floored(recall))[0]

    def _grad(self, C, prior, recall):
        return _diagonal(_gmean_and_diag_grad(prior, self._floored(recall))[1])


class HMean(Objective):
    """Harmonic mean of recalls K / sum_k 1/r_k; recalls floored at eps in surrogate and grad."""

    name = "hmean"

    def _surrogate(self, C, prior, recall):
        return _hmean_and_diag_grad(prior, self._floored(recall))[0]

    def _grad(self, C, prior, recall):
        return _diagonal(_hmean_and_diag_grad(prior, self._floored(recall))[1])


# ---------------------------------------------------------------------------------------------------
# Coverage-constrained objectives


class _CoverageObjective(_Multiplied):
    """A base metric (mean recall or H-mean) with every constrained coverage >= alpha/K.

    Surrogate: [base + sum_c mu_c cov_c] / (max mu + 1), where cov_c is a class coverage (per class) or
    the mean coverage of the head / tail classes. Update: mu_c = max(mu_max (1 - exp((cov_c - alpha/K)
    / tau)), 0), mu_0 = 0. Value: base if every cov_c >= alpha/K, else base - 1 - K * total shortfall,
    so every feasible configuration ranks above every infeasible one.
    """

    defaults = {"eps": DEFAULT_EPS, "alpha": 0.95, "tau": 0.01, "mu_max": 100.0}
    base: ClassVar[str] = "mean_recall"  # or "hmean"
    per_class: ClassVar[bool] = True  # False: the two head/tail mean coverages
    state_key = "mu"  # multipliers: mu, (K,) per class or (2,) head/tail

    def _init_multipliers(self, n_classes):
        size = n_classes if self.per_class else 2
        if self.multipliers is None:
            self.multipliers = np.zeros(size)
        _check_multiplier_size("mu", self.multipliers, size)

    def _constrained_coverages(self, C: np.ndarray) -> np.ndarray:
        coverage = C.sum(axis=0)
        if self.per_class:
            return coverage
        head = self.head(C.shape[0])
        return np.array([coverage[head].mean(), coverage[~head].mean()])

    def _column_weights(self, n_classes: int) -> np.ndarray:
        """d(sum_c mu_c cov_c)/dC_kl, the same for every row k: shape (K,) over columns l."""
        if self.per_class:
            return self.multipliers
        head = self.head(n_classes)
        return np.where(head, self.multipliers[0] / head.sum(), self.multipliers[1] / (~head).sum())

    def _base(self, prior, recall):
        if self.base == "mean_recall":
            return recall.mean(), 1.0 / (len(prior) * prior)
        return _hmean_and_diag_grad(prior, self._floored(recall))

    def _value(self, C, metrics):
        target = self.params["alpha"] / C.shape[0]
        shortfall = float(np.maximum(target - self._constrained_coverages(C), 0.0).sum())
        base = metrics[self.base]
        return base if shortfall == 0.0 else base - 1.0 - C.shape[0] * shortfall

    def _surrogate(self, C, prior, recall):
        base, _ = self._base(prior, recall)
        penalty = float(self.multipliers @ self._constrained_coverages(C))
        return (base + penalty) / (self.multipliers.max() + 1.0)

    def _grad(self, C, prior, recall):
        _, base_diag = self._base(prior, recall)
        grad = np.tile(self._column_weights(len(prior)), (len(prior), 1))
        grad[np.diag_indices_from(grad)] += base_diag
        grad /= self.multipliers.max() + 1.0
        return grad

    def _update(self, C, prior, recall):
        target = self.params["alpha"] / C.shape[0]
        excess = np.minimum(self._constrained_coverages(C) - target, 0.0) / self.params["tau"]
        self.multipliers = np.maximum(self.params["mu_max"] * (1.0 - np.exp(excess)), 0.0)



class MeanRecallMinCoverage(_CoverageObjective):
    """Mean recall subject to every class coverage >= alpha/K."""

    name = "mean_recall_min_coverage"
    base = "mean_recall"
    per_class = True


class HMeanMinCoverage(_CoverageObjective):
    """H-mean of recalls subject to every class coverage >= alpha/K."""

    name = "hmean_min_coverage"
    base = "hmean"
    per_class = True


class MeanRecallMinHeadTailCoverage(_CoverageObjective):
    """Mean recall subject to mean head coverage and mean tail coverage >= alpha/K."""

    name = "mean_recall_min_head_tail_coverage"
    base = "mean_recall"
    per_class = False


class HMeanMinHeadTailCoverage(_CoverageObjective):
    """H-mean of recalls subject to mean head coverage and mean tail coverage >= alpha/K."""

    name = "hmean_min_head_tail_coverage"
    base = "hmean"
    per_class = False


# ---------------------------------------------------------------------------------------------------
# Custom torch function


def _resolve_function(function) -> Callable:
    if callable(function):
        return function
    if not isinstance(function, str) or function.count(":") != 1:
        raise ConfigError(
            f"function must be a callable or a 'module:function' string, but got function={function!r}.",
            where="objective 'custom'",
        )
    module_name, attribute = function.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(
            f"cannot import module {module_name!r} of function={function!r} ({error}); "
            "make it importable (installed, or on PYTHONPATH).",
            where="objective 'custom'",
        ) from error
    resolved = getattr(module, attribute, None)
    if not callable(resolved):
        raise ConfigError(
            f"module {module_name!r} has no callable {attribute!r} (function={function!r}).",
            where="objective 'custom'",
        )
    return resolved


class CustomObjective(Objective):
    """A user metric: a torch function of the joint confusion C (K, K) float64 returning a scalar tensor.

    value = surrogate = function(C); grad by autograd. torch is imported here only, lazily.
    ``function`` is a callable or a ``"module:function"`` string (the form used in YAML).
    """

    name = "custom"
    extra = ("function",)

    def __init__(self, *, function=None, **kwargs):
        super().__init__(**kwargs)
        if function is None:
            raise ConfigError(
                "objective 'custom' needs function=<callable or 'module:function'>.",
                where="objective 'custom'",
            )
        self.function_spec = (
            function if isinstance(function, str) else getattr(function, "__name__", repr(function))
        )
        self.function = _resolve_function(function)

    def __repr__(self) -> str:
        return f"CustomObjective(function={self.function_spec!r})"

    def _evaluate(self, C: np.ndarray, *, with_grad: bool):
        import torch

        tensor = torch.tensor(C, dtype=torch.float64, requires_grad=with_grad)
        out = self.function(tensor)
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(out, dtype=torch.float64)
        if out.numel() != 1:
            raise DataError(
                f"The custom objective {self.function_spec!r} must return a scalar, but returned shape "
                f"{tuple(out.shape)}."
            )
        value = float(out.detach())
        if not math.isfinite(value):
            raise DataError(
                f"The custom objective {self.function_spec!r} returned {value!r}; expected a finite scalar."
            )
        if not with_grad:
            return value, None
        if not out.requires_grad:
            return value, np.zeros_like(C)
        (grad,) = torch.autograd.grad(out.reshape(()), tensor, allow_unused=True)
        grad = np.zeros_like(C) if grad is None else grad.detach().numpy().astype(np.float64)
        if not np.all(np.isfinite(grad)):
            raise DataError(
                f"The custom objective {self.function_spec!r} has a non-finite gradient at this confusion; "
                "guard its divisions and logs (e.g. clamp recalls at a small eps)."
            )
        return value, grad

    def value(self, C):
        return self._evaluate(joint_confusion(C), with_grad=False)[0]

    def _surrogate(self, C, prior, recall):
        return self._evaluate(C, with_grad=False)[0]

    def _grad(self, C, prior, recall):
        return self._evaluate(C, with_grad=True)[1]


# ---------------------------------------------------------------------------------------------------
# Registry

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls
    for cls in (
        MeanRecall,
        MinRecall,
        MinHeadTailRecall,
        GMean,
        HMean,
        MeanRecallMinCoverage,
        HMeanMinCoverage,
        MeanRecallMinHeadTailCoverage,
        HMeanMinHeadTailCoverage,
        CustomObjective,
    )
}


def get_objective(name: str, *, train_counts=None, **params) -> Objective:
    """Build an objective by name.

    Args:
        name: a key of :data:`OBJECTIVES`, or ``"module:function"`` for a custom torch objective.
        train_counts: (K,) training counts that define head and tail (None: class 0 most frequent).
        **params: ``eps`` (every objective), ``omega`` and ``beta`` (recall multipliers; ``beta`` ignored
            by ``min_head_tail_recall``), ``alpha``, ``tau``, ``mu_max`` (coverage objectives),
            ``function`` (``custom``). Anything else raises :class:`ConfigError` naming what is accepted.
    """
    if not isinstance(name, str):
        raise ConfigError(f"objective must be a name (str), but got {name!r}.")
    if ":" in name:
        if "function" in params:
            raise ConfigError(
                f"objective {name!r} already names a function; do not also pass function={params['function']!r}."
            )
        return CustomObjective(function=name, train_counts=train_counts, **params)
    if name not in OBJECTIVES:
        raise ConfigError(
            f"Unknown objective {name!r}. Available: {', '.join(sorted(OBJECTIVES))}, or 'module:function' "
            "for a custom torch objective."
        )
    return OBJECTIVES[name](train_counts=train_counts, **params)
