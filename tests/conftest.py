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
