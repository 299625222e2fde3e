"""Pair distribution P over the K x K class pairs and the sampler that draws mixup partners from it.

docs/method.md, The pair distribution:

    P = softmax(s G) over all K^2 entries (one joint softmax)
    positive mask (default on): pairs with G <= 0 get zero mass; if none is positive, P is uniform
    P <- (1 - eps) P + eps / K^2      (floor, after the mask; eps defaults to 1 / (K + 1))

:class:`PairSampler` draws (i, j) from P, then a labeled sample of class i and a partner of class j,
uniformly within the class. Partners come from the labeled set, or from a pool (the unlabeled set, by
pseudo-label) where the pool has a sample of class j. All randomness comes from the
``numpy.random.Generator`` passed in, which the caller owns and checkpoints.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .checks import int_problem, is_number, number_problem
from .errors import ConfigError, DataError

__all__ = ["pair_distribution", "distribution_stats", "PairSampler", "PairBatch"]


def pair_distribution(
    gain: np.ndarray,
    *,
    s: float,
    positive_only: bool = True,
    floor: float | None = None,
    normalize: bool = False,
) -> np.ndarray:
    """P over the K x K pairs, shape (K, K), float64, sums to 1; rows = label class i, columns = partner j.

    Args:
        gain: G, (K, K), finite.
        s: inverse temperature, >= 0 (s = 0 without the mask: exactly uniform).
        positive_only: give pairs with G <= 0 zero mass before the floor (uniform if none is positive).
        floor: exploration mass eps in [0, 1] spread uniformly (every pair keeps >= eps / K^2);
            None means 1 / (K + 1); 0 is the released sampler.
        normalize: divide G by max|G| first, so that s is the log-odds between the best pair and a
            zero-gain pair whatever the feature scale (the engine's ``gain_scale="max"``).
    """
    G = np.asarray(gain, dtype=np.float64)
    if G.ndim != 2 or G.shape[0] != G.shape[1] or G.shape[0] < 1:
        raise DataError(f"gain must be a square (K, K) matrix, but got shape {G.shape}.")
    if not np.all(np.isfinite(G)):
        raise DataError("gain contains NaN or inf; expected a finite (K, K) matrix.")
    K = G.shape[0]
    problems = []
    if number_problem("s", s, minimum=0):
        problems.append(number_problem("s", s, minimum=0))
    eps = 1.0 / (K + 1) if floor is None else floor
    if not is_number(eps) or not 0.0 <= eps <= 1.0:
        problems.append(f"floor must be None or a number in [0, 1], but got {floor=}.")
    if problems:
        raise ConfigError(problems, where="pair_distribution arguments")

    if normalize:
        scale = np.abs(G).max()
        if scale > 0:
            G = G / scale
    mask = G > 0 if positive_only else np.ones_like(G, dtype=bool)
    if s == 0 or not mask.any():
        probs = mask.astype(np.float64) if mask.any() else np.ones_like(G)
    else:
        logits = np.where(mask, s * G, -np.inf)
        probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if eps > 0:
        probs *= 1.0 - eps
        probs += eps / (K * K)
    return probs


def distribution_stats(P: np.ndarray) -> dict[str, float]:
    """Diagnostics of a pair distribution P (K, K): entropy in nats (0 log 0 = 0) and largest entry."""
    P = np.asarray(P, dtype=np.float64)
    positive = P[P > 0]
    return {"p_entropy": float(-(positive * np.log(positive)).sum()), "p_max": float(P.max())}


class PairBatch(NamedTuple):
    """One batch of mixup pairs, all arrays of length B.

    pairs: (B, 2) int64, (label class i, partner class j).
    anchor_index: (B,) indices into the labeled set, of class i.
    partner_index: (B,) indices into the pool where ``partner_from_pool`` is True, else into the labeled
        set; the partner's (pseudo-)label is j.
    partner_from_pool: (B,) bool.
    """

    pairs: np.ndarray
    anchor_index: np.ndarray
    partner_index: np.ndarray
    partner_from_pool: np.ndarray


class _ClassIndex:
    """Sample indices grouped by class, for vectorised uniform draws within a class."""

    def __init__(self, labels: np.ndarray, n_classes: int):
        valid = labels >= 0  # a negative label (e.g. -1: no confident pseudo-label) is never drawn
        self.counts = np.bincount(labels[valid], minlength=n_classes)
        self.starts = np.concatenate(([0], np.cumsum(self.counts)[:-1]))
        order = np.argsort(labels, kind="stable")
        self.order = order[valid[order]]  # indices sorted by class, negative labels removed

    def draw(self, classes: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
        """One index per entry of ``classes`` (B,), uniformly within that class (count must be > 0)."""
        if self.order.size == 0:
            return np.zeros(len(classes), dtype=np.int64)
        counts = np.maximum(self.counts[classes], 1)  # a class without samples is masked by the caller
        offsets = np.minimum((uniforms * counts).astype(np.int64), counts - 1)
        return self.order[np.minimum(self.starts[classes] + offsets, self.order.size - 1)]


def _check_labels(name: str, labels, n_classes: int, *, allow_negative: bool) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"{name} must be 1-D (n,), but got shape {labels.shape}.")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{name} must be integers, but got dtype {labels.dtype}.")
    labels = labels.astype(np.int64)
    low = -1 if allow_negative else 0
    if labels.size and (labels.min() < low or labels.max() >= n_classes):
        allowed = f"[0, {n_classes}) or -1 (no pseudo-label)" if allow_negative else f"[0, {n_classes})"
        raise DataError(f"{name} must lie in {allowed}, but got values in [{labels.min()}, {labels.max()}].")
    return labels


class PairSampler:
    """Draws batches of (i, j) pairs from P and one sample of each class from the data.

    Args:
        labels: (n,) labels of the labeled set (anchors, and partners where the pool has none).
        n_classes: K.
        rng: the ``numpy.random.Generator`` every draw uses; the sampler holds no other randomness, so
            restoring the generator's state restores the sampler.
        pool_labels: (m,) pseudo-labels of an optional partner pool (-1: excluded), or None.
    """

    def __init__(self, labels, *, n_classes: int, rng: np.random.Generator, pool_labels=None):
        if int_problem("n_classes", n_classes, minimum=1):
            raise ConfigError(int_problem("n_classes", n_classes, minimum=1))
        if not isinstance(rng, np.random.Generator):
            raise ConfigError(
                f"rng must be a numpy.random.Generator (e.g. np.random.default_rng(seed)), but got {type(rng).__name__}."
            )
        self.n_classes = int(n_classes)
        self.rng = rng
        self.labels = _check_labels("labels", labels, self.n_classes, allow_negative=False)
        self._labeled = _ClassIndex(self.labels, self.n_classes)
        self.pool_labels: np.ndarray | None = None
        self._pool: _ClassIndex | None = None
        self.set_pool_labels(pool_labels)
        self.distribution: np.ndarray | None = None
        self._cdf: np.ndarray | None = None

    def set_pool_labels(self, pool_labels) -> None:
        """Replace the pool's (pseudo-)labels, shape (m,) (-1: never drawn); None removes the pool."""
        if pool_labels is None:
            self.pool_labels, self._pool = None, None
            return
        self.pool_labels = _check_labels("pool_labels", pool_labels, self.n_classes, allow_negative=True)
        self._pool = _ClassIndex(self.pool_labels, self.n_classes)

    def set_distribution(self, P: np.ndarray) -> None:
        """Use P, shape (K, K), non-negative, summing to 1, for the next draws."""
        K = self.n_classes
        P = np.asarray(P, dtype=np.float64)
        if P.shape != (K, K):
            raise DataError(f"P must have shape ({K}, {K}), but got {P.shape}.")
        if not np.all(np.isfinite(P)) or np.any(P < 0) or not math.isclose(P.sum(), 1.0, abs_tol=1e-6):
            raise DataError(
                f"P must be finite, >= 0 and sum to 1, but sums to {P.sum()!r} with minimum {P.min()!r}; "
                "build it with pair_distribution."
            )
        anchors_needed = np.flatnonzero((P.sum(axis=1) > 0) & (self._labeled.counts == 0))
        partner_counts = self._labeled.counts + (0 if self._pool is None else self._pool.counts)
        partners_needed = np.flatnonzero((P.sum(axis=0) > 0) & (partner_counts == 0))
        missing = np.union1d(anchors_needed, partners_needed)
        if missing.size:
            raise DataError(
                f"P gives mass to class {', '.join(map(str, missing[:10]))}, which has no labeled sample to "
                "draw; add samples of that class or give its pairs zero mass (floor=0 and a mask)."
            )
        cdf = np.cumsum(P.ravel())
        cdf /= cdf[-1]
        self.distribution, self._cdf = P, cdf

    def sample(self, batch_size: int) -> PairBatch:
        """Draw ``batch_size`` pairs and their samples (see :class:`PairBatch`); 3 * B uniforms per call."""
        if self._cdf is None:
            raise DataError("PairSampler.sample called before set_distribution(P).")
        if int_problem("batch_size", batch_size, minimum=1):
            raise ConfigError(int_problem("batch_size", batch_size, minimum=1))
        K = self.n_classes
        uniforms = self.rng.random((3, batch_size))
        flat = np.minimum(np.searchsorted(self._cdf, uniforms[0], side="right"), K * K - 1)
        label_class, partner_class = np.divmod(flat, K)
        anchor_index = self._labeled.draw(label_class, uniforms[1])
        if self._pool is None:
            from_pool = np.zeros(batch_size, dtype=bool)
            partner_index = self._labeled.draw(partner_class, uniforms[2])
        else:
            from_pool = self._pool.counts[partner_class] > 0
            partner_index = np.where(
                from_pool,
                self._pool.draw(partner_class, uniforms[2]),
                self._labeled.draw(partner_class, uniforms[2]),
            )
        pairs = np.stack([label_class, partner_class], axis=1).astype(np.int64)
        return PairBatch(pairs, anchor_index, partner_index, from_pool)
