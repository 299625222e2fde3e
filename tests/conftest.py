"""Shared fixtures: one quiet local Ray cluster per test session (ray.init costs 3-6 s here)."""

from __future__ import annotations

import os

import pytest

# Quiet, safe Ray settings (docs/architecture.md, Facts about Ray Tune 2.60 and Optuna 5). Set here, in the test process, never at import selmix_ray.
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


# == sweep fixtures and helpers (shared by test_search, test_results, test_plots, test_cli) =================
# Session-scoped: the features, the baselines cache and the two finished sweeps are built once per session.

SWEEP_SPACE = {
    "objective": "min_recall",
    "space": {
        "method": {"choice": ["selmix", "uniform_mixup"]},
        "s": {"loguniform": [0.1, 100], "when": {"method": "selmix"}},
        "refresh_every": {"int": [2, 20], "log": True},
        "lr": {"loguniform": [0.1, 10]},
        "posthoc": {"choice": ["none", "class_weights"]},
    },
    "fixed": {"steps": 60, "eval_every": 10},
}
MULTI_SWEEP_SPACE = {"objectives": ["min_recall", "mean_recall"],
                     **{k: v for k, v in SWEEP_SPACE.items() if k != "objective"}}
SWEEP_DRIVER = os.path.join(os.path.dirname(__file__), "_sweep_driver.py")  # a child driver (kill tests)


def trial_results(trial_dir) -> list[dict]:
    """Every record of a trial's result.json (what Tune wrote at each report), oldest first."""
    import json
    from pathlib import Path

    lines = (Path(trial_dir) / "result.json").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def results_on_disk(experiment) -> int:
    """How many reports the trials of ``experiment`` have written to their result.json files so far."""
    from pathlib import Path

    total = 0
    for path in Path(experiment).glob("run_trial_*/result.json"):
        try:
            total += sum(1 for line in path.read_text().splitlines() if line.strip())
        except OSError:
            continue
    return total


def kill_after_results(child, experiment, k: int, *, timeout: float = 300, then_wait: float = 0.0) -> None:
    """SIGKILL the driver ``child`` ``then_wait`` seconds after its trials have written ``k`` reports
    (independent of when Tune snapshots); fails the test when the driver ends first or takes longer than
    ``timeout``."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    try:
        while results_on_disk(experiment) < k:
            assert child.poll() is None, "the driver ended before it could be killed"
            assert time.monotonic() < deadline, f"the sweep did not write {k} reports in time"
            time.sleep(0.05)
        time.sleep(then_wait)
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()


@pytest.fixture(scope="session")
def cache_home(tmp_path_factory):
    """A private XDG cache (features, baselines) for the session, shared with child drivers through the
    environment; the previous value comes back at the end."""
    path = tmp_path_factory.mktemp("xdg_cache")
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(path)
    yield path
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session")
def digits(cache_home):
    """digits features, rho 10, backbone "identity" (d = 64): the features of every test sweep."""
    from selmix_ray.features import build_features

    return build_features("digits", rho=10, backbone="identity")


@pytest.fixture(scope="session")
def experiments(tmp_path_factory):
    """The storage folder of the session's shared sweeps."""
    return tmp_path_factory.mktemp("experiments")


@pytest.fixture(scope="session")
def sweep(ray_cluster, digits, experiments):
    """A finished 8-trial ASHA sweep of SWEEP_SPACE (some trials pruned); its experiment folder."""
    from selmix_ray.sweep import search

    search(SWEEP_SPACE, features=digits, storage=experiments, name="single", num_samples=8, max_concurrent=2,
           seed=0)
    return experiments / "single"


@pytest.fixture(scope="session")
def multi_sweep(ray_cluster, digits, experiments):
    """A finished 3-trial multi-objective (min_recall, mean_recall) sweep; its experiment folder."""
    from selmix_ray.sweep import search

    search(MULTI_SWEEP_SPACE, features=digits, storage=experiments, name="multi", num_samples=3,
           max_concurrent=2, seed=0)
    return experiments / "multi"
