"""Pair distribution (mask, floor, temperature) and the pair sampler (frequencies, fallback, determinism)."""

from __future__ import annotations

import numpy as np
import pytest

from selmix_ray.errors import ConfigError, DataError, SelMixError
from selmix_ray.sampling import PairSampler, distribution_stats, pair_distribution


def reference_distribution(G, s, positive_only, eps):
    """docs/method.md, The pair distribution, entry by entry."""
    K = len(G)
    weights = {}
    for i in range(K):
        for j in range(K):
            if not positive_only or G[i, j] > 0:
                weights[i, j] = np.exp(s * G[i, j])
    P = np.zeros((K, K))
    if not weights:
        P[:] = 1.0 / K**2
    for (i, j), w in weights.items():
        P[i, j] = w / sum(weights.values())
    return (1 - eps) * P + eps / K**2


GAIN = np.array([[0.5, -0.2, 0.1], [0.0, 1.0, -1.0], [0.3, 0.2, -0.4]])


@pytest.mark.parametrize("positive_only", [True, False])
@pytest.mark.parametrize("s, floor", [(2.0, None), (0.7, 0.0), (5.0, 0.3), (0.0, 0.1)])
def test_pair_distribution_matches_the_definition(s, floor, positive_only):
    P = pair_distribution(GAIN, s=s, positive_only=positive_only, floor=floor)
    eps = 1 / 4 if floor is None else floor
    np.testing.assert_allclose(P, reference_distribution(GAIN, s, positive_only, eps), rtol=1e-12)
    assert P.sum() == pytest.approx(1.0, abs=1e-12)


def test_mask_zeroes_non_positive_pairs_before_the_floor():
    P = pair_distribution(GAIN, s=1.0, floor=0.0)
    assert np.all(P[GAIN <= 0] == 0.0) and np.all(P[GAIN > 0] > 0)


def test_no_positive_gain_gives_uniform():
    P = pair_distribution(-np.abs(GAIN), s=3.0, floor=0.2)
    np.testing.assert_allclose(P, 1 / 9, rtol=1e-14)


def test_s_zero_without_mask_is_exactly_uniform():
    for floor in (None, 0.0, 0.5):
        P = pair_distribution(GAIN * 100, s=0.0, positive_only=False, floor=floor)
        assert np.all(P == P[0, 0]) and P[0, 0] == pytest.approx(1 / 9, rel=1e-15)


@pytest.mark.parametrize("floor", [None, 1e-3, 0.5])
def test_floor_gives_every_pair_at_least_eps_over_K_squared(floor):
    G = np.random.default_rng(0).normal(size=(6, 6)) * 50
    P = pair_distribution(G, s=10.0, floor=floor)
    eps = 1 / 7 if floor is None else floor
    assert P.min() >= eps / 36 * (1 - 1e-12)


def test_normalize_divides_by_the_largest_absolute_gain():
    P = pair_distribution(GAIN * 300, s=2.0, normalize=True)
    np.testing.assert_allclose(P, pair_distribution(GAIN, s=2.0), rtol=1e-12)
    np.testing.assert_allclose(pair_distribution(np.zeros((3, 3)), s=2.0, normalize=True), 1 / 9)


def test_large_s_stays_finite():
    P = pair_distribution(GAIN * 1e6, s=100.0, floor=0.0)
    assert np.all(np.isfinite(P)) and P[1, 1] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "gain, kwargs, error, fragment",
    [
        (GAIN, dict(s=-1.0), ConfigError, "s must be a finite number >= 0"),
        (GAIN, dict(s=float("nan")), ConfigError, "s must be a finite number >= 0"),
        (GAIN, dict(s=1.0, floor=1.5), ConfigError, r"floor must be None or a number in \[0, 1\]"),
        (GAIN[:2], dict(s=1.0), DataError, r"square \(K, K\) matrix, but got shape \(2, 3\)"),
        (np.where(GAIN > 0.4, np.nan, GAIN), dict(s=1.0), DataError, "NaN or inf"),
    ],
)
def test_pair_distribution_rejects_bad_arguments(gain, kwargs, error, fragment):
    with pytest.raises(error, match=fragment) as info:
        pair_distribution(gain, **kwargs)
    assert isinstance(info.value, SelMixError)


def test_distribution_stats():
    stats = distribution_stats(np.full((4, 4), 1 / 16))
    assert stats["p_entropy"] == pytest.approx(np.log(16)) and stats["p_max"] == 1 / 16
    one_hot = np.zeros((4, 4))
    one_hot[2, 1] = 1.0
    assert distribution_stats(one_hot) == {"p_entropy": 0.0, "p_max": 1.0}


# ---------------------------------------------------------------------------------------------------
# PairSampler


def long_tailed_labels(rng, K=4):
    counts = [40, 20, 8, 3][:K]
    return rng.permutation(np.repeat(np.arange(K), counts))


def test_empirical_pair_frequencies_match_P():
    rng = np.random.default_rng(7)
    labels = long_tailed_labels(rng)
    P = pair_distribution(np.random.default_rng(1).normal(size=(4, 4)), s=2.0)
    sampler = PairSampler(labels, n_classes=4, rng=rng)
    sampler.set_distribution(P)
    pairs = np.concatenate([sampler.sample(500).pairs for _ in range(40)])  # 20 000 draws
    observed = np.bincount(pairs[:, 0] * 4 + pairs[:, 1], minlength=16)
    expected = P.ravel() * len(pairs)
    chi_square = ((observed - expected) ** 2 / expected).sum()
    assert chi_square < 37.70  # the 0.999 quantile of chi-square with 15 degrees of freedom


def test_samples_have_the_drawn_classes_and_are_uniform_within_a_class():
    rng = np.random.default_rng(8)
    labels = long_tailed_labels(rng)
    sampler = PairSampler(labels, n_classes=4, rng=rng)
    sampler.set_distribution(pair_distribution(np.zeros((4, 4)), s=0.0, positive_only=False))
    batch = sampler.sample(20_000)
    assert batch.pairs.shape == (20_000, 2) and batch.pairs.dtype == np.int64
    np.testing.assert_array_equal(labels[batch.anchor_index], batch.pairs[:, 0])
    np.testing.assert_array_equal(labels[batch.partner_index], batch.pairs[:, 1])
    assert not batch.partner_from_pool.any()
    class3 = np.flatnonzero(labels == 3)  # 3 samples: each about a third of the class-3 anchors
    hits = np.bincount(batch.anchor_index[batch.pairs[:, 0] == 3], minlength=len(labels))[class3]
    assert hits.min() > 0.28 * hits.sum()


def test_partners_come_from_the_pool_by_pseudo_label_with_a_labeled_fallback():
    rng = np.random.default_rng(9)
    labels = long_tailed_labels(rng)
    pool = np.array([0, 1, 1, -1, 0, 2, -1, 1])  # no pseudo-label 3; -1 never drawn
    sampler = PairSampler(labels, n_classes=4, rng=rng, pool_labels=pool)
    sampler.set_distribution(np.full((4, 4), 1 / 16))
    batch = sampler.sample(4000)
    partner_class = batch.pairs[:, 1]
    np.testing.assert_array_equal(batch.partner_from_pool, partner_class != 3)
    from_pool = batch.partner_from_pool
    np.testing.assert_array_equal(pool[batch.partner_index[from_pool]], partner_class[from_pool])
    np.testing.assert_array_equal(labels[batch.partner_index[~from_pool]], partner_class[~from_pool])
    assert not np.isin(batch.partner_index[from_pool], [3, 6]).any()

    sampler.set_pool_labels(np.array([3, 3, 0]))  # pseudo-labels refreshed
    batch = sampler.sample(2000)
    np.testing.assert_array_equal(batch.partner_from_pool, np.isin(batch.pairs[:, 1], [0, 3]))
    sampler.set_pool_labels(np.full(5, -1))  # nothing confident: every partner from the labeled set
    assert not sampler.sample(100).partner_from_pool.any()


def test_sampler_randomness_is_the_generator_passed_in():
    labels = long_tailed_labels(np.random.default_rng(10))
    P = pair_distribution(np.random.default_rng(2).normal(size=(4, 4)), s=1.0)
    rng = np.random.default_rng(123)
    sampler = PairSampler(labels, n_classes=4, rng=rng, pool_labels=[0, 1, 2])
    sampler.set_distribution(P)
    sampler.sample(10)
    saved = rng.bit_generator.state
    first = sampler.sample(64)
    rng.bit_generator.state = saved  # the engine restores its generator: the sampler follows
    second = sampler.sample(64)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_sampler_never_draws_zero_mass_pairs():
    labels = long_tailed_labels(np.random.default_rng(11))
    P = np.zeros((4, 4))
    P[1, 3], P[2, 0] = 0.25, 0.75
    sampler = PairSampler(labels, n_classes=4, rng=np.random.default_rng(0))
    sampler.set_distribution(P)
    pairs = sampler.sample(5000).pairs
    assert set(map(tuple, pairs.tolist())) == {(1, 3), (2, 0)}


def test_sampler_errors():
    labels = np.array([0, 0, 1, 1, 2])  # class 3 has no labeled sample
    sampler = PairSampler(labels, n_classes=4, rng=np.random.default_rng(0))
    with pytest.raises(DataError, match="before set_distribution"):
        sampler.sample(4)
    with pytest.raises(DataError, match="class 3, which has no labeled sample"):
        sampler.set_distribution(np.full((4, 4), 1 / 16))
    with pytest.raises(DataError, match=r"P must have shape \(4, 4\)"):
        sampler.set_distribution(np.full((3, 3), 1 / 9))
    with pytest.raises(DataError, match="sum to 1"):
        sampler.set_distribution(np.full((4, 4), 1 / 8))
    P = np.zeros((4, 4))
    P[:3, :3] = 1 / 9
    sampler.set_distribution(P)  # class 3 has no mass: fine
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1"):
        sampler.sample(0)
    with pytest.raises(ConfigError, match="numpy.random.Generator"):
        PairSampler(labels, n_classes=4, rng=0)
    with pytest.raises(DataError, match=r"labels must lie in \[0, 4\)"):
        PairSampler(np.array([0, 4]), n_classes=4, rng=np.random.default_rng(0))
    with pytest.raises(DataError, match=r"pool_labels must lie in \[0, 4\) or -1"):
        PairSampler(labels, n_classes=4, rng=np.random.default_rng(0), pool_labels=[-2])
    with pytest.raises(DataError, match="must be integers"):
        PairSampler(np.array([0.5, 1.0]), n_classes=4, rng=np.random.default_rng(0))
