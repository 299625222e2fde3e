"""Mixup variants: exact feature mixing, CutMix area bookkeeping, PuzzleMix mask properties, targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selmix_ray import mixup
from selmix_ray.errors import ConfigError, DataError


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _lam(batch: int, seed: int, lambda_min: float = 0.6) -> torch.Tensor:
    return lambda_min + (1.0 - lambda_min) * torch.rand(batch, generator=_generator(seed + 1000))


def _labelled_maps(batch: int, channels: int, height: int, width: int):
    """a and b whose every (sample, position) vector is unique: a's are positive, b's negative."""
    codes = torch.arange(1, batch * height * width + 1, dtype=torch.float64).reshape(batch, 1, height, width)
    a = codes.expand(batch, channels, height, width).clone()
    return a, -a


def _boundary_edges(mask: np.ndarray) -> np.ndarray:
    """(B,) number of 4-neighbour pairs with different values in a (B, H, W) bool mask."""
    return (mask[:, 1:] != mask[:, :-1]).sum(axis=(1, 2)) + (mask[:, :, 1:] != mask[:, :, :-1]).sum(axis=(1, 2))


def test_variants_and_needs_maps():
    assert mixup.VARIANTS == ("feature", "feature_soft", "cutmix", "puzzlemix")
    assert [mixup.needs_maps(v) for v in mixup.VARIANTS] == [False, False, True, True]


@pytest.mark.parametrize("variant", ["feature", "feature_soft"])
def test_feature_mixing_is_exactly_convex(variant):
    gen = _generator(3)
    a, b = torch.randn(32, 7, generator=gen), torch.randn(32, 7, generator=gen)
    lam = _lam(32, seed=3)
    mixed, lam_eff = mixup.mix(variant, a, b, lam, generator=_generator())
    assert torch.equal(lam_eff, lam)
    for n in range(32):  # slow per-sample reference
        expected = lam[n] * a[n] + (1 - lam[n]) * b[n]
        torch.testing.assert_close(mixed[n], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", mixup.VARIANTS)
def test_lam_one_returns_a(variant):
    shape = (6, 3, 4, 4) if mixup.needs_maps(variant) else (6, 5)
    gen = _generator(1)
    a, b = torch.rand(shape, generator=gen), torch.rand(shape, generator=gen)
    mixed, lam_eff = mixup.mix(variant, a, b, torch.ones(6), generator=_generator())
    assert torch.equal(mixed, a)
    assert torch.equal(lam_eff, torch.ones(6))


@pytest.mark.parametrize("size", [(4, 4), (8, 8), (5, 7)])
def test_cutmix_lam_eff_is_the_measured_fraction_and_unbiased(size):
    height, width = size
    batch = 2000
    a, b = _labelled_maps(batch, 2, height, width)
    lam = _lam(batch, seed=height)
    mixed, lam_eff = mixup.mix("cutmix", a, b, lam, generator=_generator(height))
    from_a = (mixed == a).all(dim=1)
    from_b = (mixed == b).all(dim=1)
    assert torch.all(from_a ^ from_b)  # every position is from exactly one input, same position
    measured = from_a.to(torch.float64).mean(dim=(1, 2))
    torch.testing.assert_close(lam_eff.to(torch.float64), measured, rtol=0, atol=1e-6)  # float32 lam
    # the cells from b form one axis-aligned box
    rows_used = from_b.any(dim=2).sum(dim=1)
    cols_used = from_b.any(dim=1).sum(dim=1)
    assert torch.equal(rows_used * cols_used, from_b.sum(dim=(1, 2)))
    # the area matches 1 - lam on average (stochastic rounding), and per sample within the grid's resolution
    bias = float(((1 - lam_eff) - (1 - lam)).mean())
    assert abs(bias) < 0.01
    assert float(((1 - lam_eff) - (1 - lam)).abs().max()) <= 0.5 + 1e-9


def test_cutmix_uses_only_the_given_generator():
    a, b = _labelled_maps(16, 2, 4, 4)
    lam = _lam(16, seed=0)
    global_state = torch.get_rng_state()
    first, _ = mixup.mix("cutmix", a, b, lam, generator=_generator(5))
    again, _ = mixup.mix("cutmix", a, b, lam, generator=_generator(5))
    assert torch.equal(torch.get_rng_state(), global_state)
    assert torch.equal(first, again)


def _puzzle(batch=64, size=8, seed=0, channels=16):
    gen = _generator(seed)
    a = torch.randn(batch, channels, size, size, generator=gen).relu() * torch.rand(batch, 1, size, size, generator=gen)
    b = torch.randn(batch, channels, size, size, generator=gen).relu() * torch.rand(batch, 1, size, size, generator=gen)
    lam = _lam(batch, seed=seed)
    return a, b, lam


def _puzzle_sources(a, b, mixed):
    """(B, H*W) source index: position p of a -> p, cell q of b -> H*W + q; -1 if neither."""
    batch, channels, height, width = a.shape
    cells = height * width
    pool = torch.cat([a.reshape(batch, channels, cells), b.reshape(batch, channels, cells)], dim=2)
    flat = mixed.reshape(batch, channels, cells)
    match = (flat[:, :, :, None] == pool[:, :, None, :]).all(dim=1)  # (B, cells, 2 cells)
    assert torch.all(match.sum(dim=2) == 1), "each mixed cell must equal exactly one input cell"
    return match.to(torch.int64).argmax(dim=2)


@pytest.mark.parametrize("size", [4, 8])
def test_puzzlemix_mask_is_binary_area_near_target_and_smooth(size):
    a, b, lam = _puzzle(size=size, seed=size)
    cells = size * size
    mixed, lam_eff = mixup.mix("puzzlemix", a, b, lam, generator=_generator(size))
    source = _puzzle_sources(a, b, mixed)
    from_b = source >= cells
    # binary and in place for a: a cell from a sits where it was
    positions = torch.arange(cells).expand_as(source)
    assert torch.all(source[~from_b] == positions[~from_b])
    # b's cells are used at most once each (an assignment)
    for n in range(source.shape[0]):
        used = source[n][from_b[n]]
        assert used.unique().numel() == used.numel()
    torch.testing.assert_close(lam_eff.to(torch.float64), 1 - from_b.to(torch.float64).mean(dim=1))
    error = ((1 - lam_eff) - (1 - lam)).to(torch.float64)
    assert abs(float(error.mean())) < 0.03
    assert float(error.abs().mean()) < 1.5 / cells + 0.01  # within about one cell on average
    # smoother than a random mask of the same area
    mask = from_b.reshape(-1, size, size).numpy()
    rng = np.random.default_rng(0)
    random_masks = np.stack([rng.permutation(cells).reshape(size, size) < m.sum() for m in mask])
    assert _boundary_edges(mask).mean() < 0.6 * _boundary_edges(random_masks).mean()


def test_puzzlemix_avoids_salient_cells_of_a_and_takes_salient_cells_of_b():
    size, batch = 4, 64
    a, b, lam = _puzzle(batch=batch, size=size, seed=7)
    # give b distinct cell saliencies 1..16 (spacing larger than the move cost) with random layout
    gen = _generator(8)
    scale = torch.stack([torch.randperm(size * size, generator=gen) + 1.0 for _ in range(batch)])
    b = torch.ones_like(b) * scale.reshape(batch, 1, size, size)
    b = b + 1e-3 * torch.arange(b.shape[1], dtype=b.dtype)[None, :, None, None]  # keep channels distinct
    b = b * (1 + 1e-6 * torch.arange(batch * size * size, dtype=b.dtype).reshape(batch, 1, size, size))
    mixed, _ = mixup.mix("puzzlemix", a, b, torch.full((batch,), 0.6), generator=_generator(9))
    source = _puzzle_sources(a, b, mixed)
    from_b = source >= size * size
    saliency_a = torch.linalg.vector_norm(a, dim=1).reshape(batch, -1)
    share = (saliency_a * from_b).sum(dim=1) / saliency_a.sum(dim=1)
    assert float(share.mean()) < float(from_b.to(torch.float64).mean())  # less of a's saliency than its area
    for n in range(batch):
        used = source[n][from_b[n]] - size * size
        top = torch.argsort(scale[n], descending=True)[: used.numel()]
        assert set(used.tolist()) == set(top.tolist())


def test_puzzlemix_is_deterministic_under_the_same_generator_seed():
    a, b, lam = _puzzle(batch=16, size=4, seed=1)
    first, lam_first = mixup.mix("puzzlemix", a, b, lam, generator=_generator(11))
    again, lam_again = mixup.mix("puzzlemix", a, b, lam, generator=_generator(11))
    assert torch.equal(first, again) and torch.equal(lam_first, lam_again)
    flat = torch.ones(16, 2, 8, 8)  # flat saliency: the random centre decides where the blob goes
    masks = [
        mixup.mix("puzzlemix", flat, -flat, torch.full((16,), 0.7), generator=_generator(seed))[0] < 0
        for seed in (1, 2)
    ]
    assert not torch.equal(masks[0], masks[1])


def test_targets_rows_sum_to_one():
    i = torch.tensor([0, 2, 1, 1])
    j = torch.tensor([1, 2, 0, 3])
    lam = torch.tensor([0.6, 0.9, 1.0, 0.75])
    for variant in ("feature", "cutmix", "puzzlemix"):
        t = mixup.targets(variant, i, j, lam, 4)
        assert torch.equal(t, torch.nn.functional.one_hot(i, 4).to(t.dtype))
    soft = mixup.targets("feature_soft", i, j, lam, 4)
    expected = torch.tensor(
        [[0.6, 0.4, 0, 0], [0, 0, 1.0, 0], [0, 1.0, 0, 0], [0, 0.75, 0, 0.25]], dtype=soft.dtype
    )
    torch.testing.assert_close(soft, expected)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(4))


def test_errors():
    a = torch.zeros(4, 8)
    with pytest.raises(ConfigError, match="Unknown mixup variant 'mixup'"):
        mixup.mix("mixup", a, a, torch.ones(4), generator=_generator())
    with pytest.raises(ConfigError, match="Available"):
        mixup.needs_maps("cutout")
    with pytest.raises(ConfigError):
        mixup.targets("nope", torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), torch.ones(4), 3)
    for variant in ("cutmix", "puzzlemix"):
        with pytest.raises(DataError, match="keep_maps=True"):
            mixup.mix(variant, a, a, torch.ones(4), generator=_generator())
    with pytest.raises(DataError, match="same shape"):
        mixup.mix("feature", a, torch.zeros(4, 9), torch.ones(4), generator=_generator())
    with pytest.raises(DataError, match="lam must have shape"):
        mixup.mix("feature", a, a, torch.ones(5), generator=_generator())
