"""Post-hoc corrections that can follow any method (docs/method.md, One trial), numpy only.

A correction adds one offset per class to the logits, ``adjusted = logits + offsets`` with ``offsets``
(K,), and is fitted to maximise the objective's ``value`` on a fitting set (the validation split):

- ``"none"``: offsets 0, the identity.
- ``"logit_adjust"``: ``offsets = -tau * log(prior)``, prior = training class frequencies (Menon et al.,
  "Long-tail learning via logit adjustment", ICLR 2021); ``tau`` is the value of :data:`TAU_GRID` with the
  best objective on the fitting set (the smallest such tau on ties).
- ``"class_weights"``: predict ``argmax_l (logits_l + log w_l)``: the class-weighted plug-in classifier,
  the Bayes-optimal form for a metric that is linear in the diagonal of the confusion (Narasimhan,
  Ramaswamy, Saha and Agarwal, "Consistent multiclass algorithms for complex performance measures",
  ICML 2015; Narasimhan and Menon, "Training over-parameterized models with non-decomposable objectives",
  NeurIPS 2021). The weights are fitted on the fitting set by exponentiated-gradient steps on ``w``
  (additive steps on ``log w``), the metric linearised by the objective at each round:

  0. start at the tuned logit adjustment when ``train_counts`` is given (so the fit never ends below it on
     the fitting set), else at ``log w = 0``;
  1. classify the fitting set with the current ``log w``; measure its joint confusion C (K, K); keep the
     ``log w`` with the best ``objective.value(C)`` seen so far, mean recall breaking ties (min recall
     stays at 0 while several classes have none), the first one on exact ties;
  2. ``objective.update(C)`` (e.g. min recall's multipliers ``lambda = softmax(-omega r)`` move onto the
     worst classes) and ``G = objective.grad(C)`` (K, K), the linear metric ``<G, C>`` to improve; for a
     metric of recalls G is diagonal, ``G_kk = dM/dr_k / pi_k``;
  3. for every class m, the exact change of ``<G, C>`` if ``log w_m`` alone rose by the step ``eta``:
     the samples whose gap ``max_l a_l(x) - a_m(x)`` lies in (0, eta) switch their prediction to m, each
     adding ``(G[y, m] - G[y, pred]) / n``. Unlike a plug-in of ``diag G`` into calibrated probabilities,
     this needs no calibration (the head was trained on a different prior than the fitting set), and it
     also sees off-diagonal terms such as coverage multipliers;
  4. ``log w += eta * benefit / max|benefit|``, centred to mean 0; ``eta`` starts at the median top-1 vs
     top-2 logit gap of the fitting set and decays as ``1 / sqrt(1 + t)``.

  :data:`CLASS_WEIGHT_ROUNDS` rounds, deterministic; 300 rounds fitted the fitting set slightly better and
  did no better on held-out data.

  Cost. Only the samples whose gap to class m lies in (0, eta) matter in step 3, and the arg-max of
  step 1 only needs each sample's top, so a round works on the (sample, class) entries whose adjusted
  logit lies within a window of the sample's top (``_NearTop``), not on all n K. The window is
  ``(1 + _NEAR_RESERVE) * eta`` when the entries are chosen (one dense pass); the offsets then move a gap
  by at most the range of their drift since, so the entries are chosen again only when a class left out
  could have come within ``eta`` of its top: the result is the dense computation's bit for bit (the same
  sums in the same order; tests/test_posthoc.py keeps the dense version as the reference). A fit costs a
  few dense passes (the logit-adjustment warm start's 13 arg-maxes, the initial step, the choices) plus
  O(entries + K^2) per round. At K = 1000 with 20 000 validation rows (the ImageNet-LT shape of
  benchmarks/bench_scale.py) the first window held 84 classes per sample and lasted 30 rounds; a 200-step
  trial with three reports spent 101 s of 207 s in post-hoc fitting, against 536 s of 651 s with the
  former O(n K) rounds, the two run side by side (benchmarks/bench_trial.py, load average 2-9 on 2 cores). What is left is the
  dense passes (the warm start's 13 arg-maxes above all), which grow as n K must. Cross-fitting splits
  each class in O(n log n) in all (one stable sort), not one pass over the labels per class. With K free weights it fits the
  fitting set more closely than the one-parameter logit adjustment and can overfit a small validation
  split; cross-fitting (below) shows this honestly.

Scores of a correction fitted on the samples it is scored on are optimistic. :func:`cross_fitted_confusion`
splits the fitting set per class into two halves, fits on each and predicts the other, and sums the two
confusions: the ``val/*`` scores. The correction applied to test is fitted on the whole validation split.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError, DataError
from .metrics import confusion_counts

__all__ = ["KINDS", "TAU_GRID", "CLASS_WEIGHT_ROUNDS", "Correction", "fit_correction", "cross_fitted_confusion",
           "cross_fitted_predictions"]

KINDS = ("none", "logit_adjust", "class_weights")
TAU_GRID = tuple(0.25 * step for step in range(13))  # logit-adjustment strengths tried: 0, 0.25, ..., 3
CLASS_WEIGHT_ROUNDS = 100  # exponentiated-gradient rounds of the class-weight fit
_TIE = 1e-12  # an objective value must beat the best by more than this to replace it
_NEAR_RESERVE = 4.0  # class-weight fit: classes within (1 + this) * eta of a top are tracked (module docstring)


@dataclass(frozen=True)
class Correction:
    """A fitted post-hoc correction: ``apply(logits) = logits + offsets``.

    Attributes:
        kind: one of :data:`KINDS`.
        offsets: (K,) float64 added to every row of the logits.
        params: JSON-able record of the fit: ``kind``, ``offsets`` (list), and ``tau`` (logit_adjust) or
            ``log_weights``, ``best_round`` (class_weights), with ``fit_objective``, the objective value on
            the fitting set.
    """

    kind: str
    offsets: np.ndarray
    params: dict = field(default_factory=dict)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Adjusted logits (n, K), float64, from logits (n, K); argmax of the result is the prediction."""
        logits = np.asarray(logits, dtype=np.float64)
        if logits.ndim != 2 or logits.shape[1] != self.offsets.shape[0]:
            raise DataError(
                f"This correction was fitted for {self.offsets.shape[0]} classes and needs logits "
                f"(n, {self.offsets.shape[0]}), but got shape {logits.shape}."
            )
        return logits + self.offsets

    @classmethod
    def from_params(cls, params: dict) -> Correction:
        """Rebuild a correction from its ``params`` (e.g. read back from a history file)."""
        return cls(kind=params["kind"], offsets=np.asarray(params["offsets"], dtype=np.float64), params=params)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"Unknown post-hoc correction {kind!r}. Available: {', '.join(KINDS)}.")


def _check_inputs(logits, labels, n_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise DataError(f"logits must have shape (n, K) with K >= 2, but got {logits.shape}.")
    if n_classes is not None and logits.shape[1] != n_classes:
        raise DataError(f"logits must have {n_classes=} columns, but got shape {logits.shape}.")
    if labels.shape != (logits.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"labels must be integers of shape ({logits.shape[0]},) to match the logits, but got "
            f"{labels.dtype} {labels.shape}."
        )
    if not np.all(np.isfinite(logits)):
        raise DataError("logits contain NaN or inf; a post-hoc correction needs finite logits.")
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise DataError(f"labels must lie in [0, {logits.shape[1]}), but got [{labels.min()}, {labels.max()}].")
    return logits, labels


def _confusion(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Joint confusion (K, K) of argmax(logits) against labels."""
    n_classes = logits.shape[1]
    return confusion_counts(labels, logits.argmax(axis=1), n_classes) / labels.shape[0]


def _log_prior(train_counts, n_classes: int) -> np.ndarray:
    if train_counts is None:
        raise DataError("logit_adjust needs train_counts (K,), the training class counts; got None.")
    counts = np.asarray(train_counts, dtype=np.float64)
    if counts.shape != (n_classes,):
        raise DataError(f"train_counts must have shape ({n_classes},), but got {counts.shape}.")
    if not np.all(np.isfinite(counts)) or np.any(counts <= 0):
        bad = np.flatnonzero(~(np.isfinite(counts) & (counts > 0)))
        raise DataError(
            f"logit_adjust needs a positive training count for every class, but class {int(bad[0])} has "
            f"{counts[bad[0]]!r}; use class_weights, which does not use the training prior."
        )
    return np.log(counts / counts.sum())


def _fit_logit_adjust(logits, labels, objective, train_counts) -> Correction:
    log_prior = _log_prior(train_counts, logits.shape[1])
    best_tau, best_value = 0.0, -np.inf
    for tau in TAU_GRID:
        value = objective.value(_confusion(logits - tau * log_prior, labels))
        if value > best_value + _TIE:
            best_tau, best_value = tau, value
    offsets = -best_tau * log_prior
    params = {"kind": "logit_adjust", "tau": best_tau, "offsets": offsets.tolist(), "fit_objective": best_value}
    return Correction("logit_adjust", offsets, params)


def _initial_step(logits: np.ndarray) -> float:
    """Median gap between the largest and second-largest logit (the scale of a useful offset)."""
    top2 = np.partition(logits, logits.shape[1] - 2, axis=1)[:, -2:]
    gap = float(np.median(top2[:, 1] - top2[:, 0]))
    return gap if gap > 0 else 1.0


def _fit_class_weights(logits, labels, objective, start: np.ndarray, rounds: int) -> Correction:
    n_samples, n_classes = logits.shape
    step0 = _initial_step(logits)
    log_w = start - start.mean()
    near = _NearTop(logits)
    best_log_w, best_key, best_round = log_w.copy(), (-np.inf, -np.inf), 0
    for t in range(rounds):
        eta = step0 / np.sqrt(1.0 + t)
        near.track(log_w, eta)
        pred = near.predict()
        C = confusion_counts(labels, pred, n_classes) / n_samples
        # objective value first; mean recall breaks ties (e.g. min recall stuck at 0 while classes improve)
        key = (objective.value(C), float(np.mean(np.diag(C) / C.sum(axis=1))))
        if _better(key, best_key):
            best_log_w, best_key, best_round = log_w.copy(), key, t
        objective.update(C)
        G = objective.grad(C)  # (K, K): the linear metric <G, C> to raise this round
        benefit = near.switch_benefit(labels, G, eta)
        largest = np.abs(benefit).max()
        if largest > 0:
            log_w = log_w + eta * benefit / largest
            log_w -= log_w.mean()
    params = {
        "kind": "class_weights",
        "log_weights": best_log_w.tolist(),
        "offsets": best_log_w.tolist(),
        "best_round": best_round,
        "rounds": rounds,
        "fit_objective": best_key[0],
    }
    return Correction("class_weights", best_log_w, params)


class _NearTop:
    """The (sample, class) entries whose adjusted logit lies near the sample's top, kept exact as the
    offsets drift (module docstring, cost).

    ``track(log_w, eta)`` makes the entries cover every class whose gap to its sample's top is below
    ``eta`` (and every top); the entries are sorted by sample, then class, as ``np.nonzero`` of a dense
    (n, K) mask would give them, so sums over them add in the same order as the dense computation.
    """

    def __init__(self, logits: np.ndarray):
        self.logits = logits  # (n, K) float64
        self.largest = float(max(-logits.min(), logits.max())) if logits.size else 0.0  # once, no (n, K) copy
        self.base: np.ndarray | None = None  # the offsets the entries were chosen at
        self.window = 0.0

    def track(self, log_w: np.ndarray, eta: float) -> None:
        """Set the offsets; re-choose the entries if a class left out could now be within ``eta``."""
        slack = 1e-9 * (1.0 + self.largest + np.abs(log_w).max())  # float rounding of the sums
        # a left-out class was >= window below its top at the base; offsets move a gap by at most ptp(drift)
        if self.base is None or self.window - np.ptp(log_w - self.base) < eta + slack:
            self._choose(log_w, eta)
        self.values = self.entry_logits + log_w[self.cls]  # the same float sums as logits + log_w
        self.top = np.maximum.reduceat(self.values, self.starts)  # (n,)
        self.gap = self.top[self.sample] - self.values  # >= 0, 0 at the top
        # the arg-max: the first entry at the top of each sample (the lowest class among ties, as argmax)
        positions = np.where(self.gap == 0, np.arange(self.gap.size), self.gap.size)
        self.pred = self.cls[np.minimum.reduceat(positions, self.starts)]

    def _choose(self, log_w: np.ndarray, eta: float) -> None:
        adjusted = self.logits + log_w  # (n, K)
        self.window = (1.0 + _NEAR_RESERVE) * eta + 1e-9 * (1.0 + np.abs(adjusted).max())
        self.sample, self.cls = np.nonzero(adjusted >= adjusted.max(axis=1, keepdims=True) - self.window)
        self.entry_logits = self.logits[self.sample, self.cls]
        sizes = np.bincount(self.sample, minlength=self.logits.shape[0])  # >= 1: the top is always in
        self.starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        self.base = log_w.copy()

    def predict(self) -> np.ndarray:
        """(n,) arg-max class of ``logits + log_w`` (the lowest class among tied tops, as ``argmax``)."""
        return self.pred

    def switch_benefit(self, labels: np.ndarray, G: np.ndarray, eta: float) -> np.ndarray:
        """(K,) change of <G, C> if the offset of class m alone rose by ``eta``, for every m.

        A sample switches to m when its gap ``top - adjusted[m]`` lies in (0, eta), moving 1/n of mass in
        C from (y, pred) to (y, m).
        """
        n_samples, n_classes = self.logits.shape
        chosen = np.flatnonzero((self.gap > 0) & (self.gap < eta))
        sample, target = self.sample[chosen], self.cls[chosen]
        true = labels[sample]
        change = G[true, target] - G[true, self.pred[sample]]
        return np.bincount(target, weights=change, minlength=n_classes) / n_samples


def _better(key: tuple[float, float], best: tuple[float, float]) -> bool:
    """Lexicographic comparison that ignores differences below the rounding tolerance."""
    for value, reference in zip(key, best):
        if value > reference + _TIE:
            return True
        if value < reference - _TIE:
            return False
    return False


def fit_correction(kind: str, logits, labels, objective, *, train_counts=None) -> Correction:
    """Fit a post-hoc correction on a fitting set (the validation split).

    Args:
        kind: one of :data:`KINDS`.
        logits: (n, K) float logits of the model to correct.
        labels: (n,) int true labels; every class needs at least one sample (the objective's value is
            undefined otherwise and raises, naming the class).
        objective: an ``objectives.Objective``; it is deep-copied, so fitting (which updates multipliers)
            leaves the caller's untouched.
        train_counts: (K,) training class counts, the prior of ``logit_adjust`` (unused by the others).

    Returns:
        the :class:`Correction`; ``Correction.apply(logits)`` gives the adjusted logits.
    """
    _check_kind(kind)
    logits, labels = _check_inputs(logits, labels)
    objective = copy.deepcopy(objective)
    if kind == "none":
        value = objective.value(_confusion(logits, labels))
        offsets = np.zeros(logits.shape[1])
        return Correction("none", offsets, {"kind": "none", "offsets": offsets.tolist(), "fit_objective": value})
    if kind == "logit_adjust":
        return _fit_logit_adjust(logits, labels, objective, train_counts)
    start = np.zeros(logits.shape[1])
    if train_counts is not None:  # warm start at the tuned logit adjustment
        start = _fit_logit_adjust(logits, labels, objective, train_counts).offsets
    return _fit_class_weights(logits, labels, objective, start, CLASS_WEIGHT_ROUNDS)


def cross_fitted_confusion(
    kind: str, logits, labels, objective, *, train_counts=None, n_classes: int, seed: int = 0
) -> np.ndarray:
    """Confusion counts (K, K), int64, of a correction scored only on samples it was not fitted on.

    The samples of each class are shuffled (``numpy.random.default_rng(seed)``) and split into two halves
    (the first half gets ``n_k // 2``); a correction fitted on one half predicts the other, both ways, and
    the two confusions are summed, so every sample is counted once. ``"none"`` needs no fit: it returns the
    plain confusion. Every class needs at least 2 samples.

    Args: as :func:`fit_correction`, plus ``n_classes`` (K) and ``seed`` for the split.
    """
    predicted = cross_fitted_predictions(kind, logits, labels, objective, train_counts=train_counts,
                                         n_classes=n_classes, seed=seed)
    return confusion_counts(np.asarray(labels), predicted, n_classes)


def cross_fitted_predictions(
    kind: str, logits, labels, objective, *, train_counts=None, n_classes: int, seed: int = 0
) -> np.ndarray:
    """(n,) int64 predicted class of every sample by the correction fitted on the other half (the
    predictions that :func:`cross_fitted_confusion` counts; arguments as there)."""
    _check_kind(kind)
    logits, labels = _check_inputs(logits, labels, n_classes)
    if kind == "none":
        return logits.argmax(axis=1)
    per_class = np.bincount(labels, minlength=n_classes)
    short = np.flatnonzero(per_class < 2)
    if short.size:
        raise DataError(
            f"Cross-fitting needs at least 2 samples of every class (one per half), but class {int(short[0])} "
            f"has {int(per_class[short[0]])}; use posthoc='none' or a validation split with more samples."
        )
    rng = np.random.default_rng(seed)
    first = np.zeros(labels.shape[0], dtype=bool)
    by_class = np.argsort(labels, kind="stable")  # each class's samples in index order, classes in turn: O(n log n)
    ends = np.cumsum(per_class)
    for k in range(n_classes):
        members = rng.permutation(by_class[ends[k] - per_class[k]:ends[k]])
        first[members[: members.size // 2]] = True
    predicted = np.empty(labels.shape[0], dtype=np.int64)
    for fit_on, score_on in ((first, ~first), (~first, first)):
        correction = fit_correction(kind, logits[fit_on], labels[fit_on], objective, train_counts=train_counts)
        predicted[score_on] = correction.apply(logits[score_on]).argmax(axis=1)
    return predicted
