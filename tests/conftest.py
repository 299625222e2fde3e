"""Shared fixtures: one quiet local Ray cluster per test session (ray.init costs 3-6 s here)."""

from __future__ import annotations

import os

import pytest

# Quiet, safe Ray settings (SPEC.md section 9). Set here, in the test process, never at import selmix_ray.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


# == engine fixtures (test_finetune, test_block, test_backbones, ...) =====================================


def _synthetic_features(*, K=4, d=6, n_max=40, rho=10.0, pool=0, maps=False, seed=0):
    """Gaussian classes, long-tailed train, balanced val (12) and test (15) per class, least-squares head.

    With ``maps``, every split carries (n, 3, 2, 2) maps and ``x`` is their global average pool. With
    ``pool``, an unlabeled split of ``pool`` samples per class (true labels kept apart). Read-only arrays.
    """
    import numpy as np

    from selmix_ray.featureset import FeatureSet, Split

    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, 1.5, (K, d))
    C, H, W = 3, 2, 2

    def split(counts, unlabeled=False):
        y = np.repeat(np.arange(K), counts)
        x = means[y] + rng.normal(0.0, 1.5, (len(y), d))
        split_maps = None
        if maps:  # d = C: each channel's map averages to the feature
            split_maps = (x[:, :C, None, None] + rng.normal(0.0, 1.0, (len(y), C, H, W))).astype(np.float32)
            split_maps -= split_maps.mean(axis=(2, 3), keepdims=True) - x[:, :C, None, None]
            x = split_maps.mean(axis=(2, 3))
        labels = -np.ones(len(y), dtype=np.int64) if unlabeled else y
        return Split(x.astype(np.float32), labels, split_maps), y

    if maps:
        d = C
        means = means[:, :C]
    counts = [max(int(n_max * rho ** (-k / (K - 1))), 2) for k in range(K)]
    train, _ = split(counts)
    val, _ = split([12] * K)
    test, _ = split([15] * K)
    unlabeled, true_y = split([pool] * K, unlabeled=True) if pool else (None, None)
    design = np.c_[train.x, np.ones(len(train.y))]
    coef = np.linalg.lstsq(design, np.eye(K)[train.y], rcond=None)[0].T  # (K, d + 1)
    fs = FeatureSet(
        train=train, val=val, test=test, unlabeled=unlabeled, unlabeled_true_y=true_y, n_classes=K,
        weight=coef[:, :d].astype(np.float32), bias=coef[:, d].astype(np.float32),
    )
    return FeatureSet.from_dict(fs.to_dict(), read_only=True)


@pytest.fixture(scope="session")
def synthetic_features():
    """Factory: ``synthetic_features(K=4, d=6, n_max=40, rho=10.0, pool=0, maps=False, seed=0)`` -> a small
    read-only FeatureSet (see ``_synthetic_features``)."""
    return _synthetic_features


@pytest.fixture
def one_thread():
    """Tiny ops are fastest and bit-reproducible on one thread (use with ``pytest.mark.usefixtures``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# == end of engine fixtures ==================================================================================


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """Start (once) a local 2-CPU Ray cluster; yields its address for child drivers to connect to."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            num_gpus=0,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=1_500_000_000,
            _temp_dir=str(tmp_path_factory.mktemp("ray")),
        )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
