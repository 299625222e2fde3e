"""Shared fixtures: one quiet local Ray cluster per test session (ray.init costs 3-6 s here)."""

from __future__ import annotations

import os

import pytest

# Quiet, safe Ray settings (SPEC.md section 9). Set here, in the test process, never at import selmix_ray.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


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
