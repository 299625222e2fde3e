"""Child process of the multi-node test: a three-node ``ray.cluster_utils.Cluster`` on this machine (each
node its own raylet and object store), a sweep into a storage folder every node shares, and one worker
node removed (killed) while one of its trials runs past a checkpoint.

    python tests/_multinode_driver.py STORAGE OUT_JSON

The test session's own Ray is a different cluster in a different process, hence the child. Features:
digits, rho 10, backbone "identity", from $XDG_CACHE_HOME (the test's cache). Writes OUT_JSON with the
node ids and what was removed; the trials log where their features live to STORAGE/fetch.log
(selmix_ray.trainable, test-only fetch log).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

SPACE = {
    "objective": "min_recall",
    "space": {"method": {"choice": ["selmix", "uniform_mixup"]}, "lr": {"loguniform": [0.1, 10]}},
    "fixed": {"steps": 20000, "eval_every": 500},  # FIFO: no trial stops early, so a victim runs to 20000
}
NUM_SAMPLES = 6
# The victim is chosen by its checkpoint folders on the shared storage (checkpoint_every=2: steps 0, 1000,
# 2000, ...), which its worker writes itself as it goes: between 2 (step 1000 checkpointed) and 15 (about
# 5000 steps, seconds, still to run). result.json was the signal before, but it reaches storage only with the
# driver's snapshot uploads, which a loaded machine spaces out: a CI run saw no trial inside the window.
MIN_CHECKPOINTS, MAX_CHECKPOINTS = 2, 15
# Why FIFO and 20000 steps: a trial on digits runs about 0.6 ms a step here, so with ASHA (900-step trials
# and a first rung at 100) the window the remover had, polling result.json, was a fraction of a second and
# it missed it (no node removed) in loaded and in idle runs alike; this window is several seconds.
STORE_BYTES = 80 * 1024 * 1024


def main() -> None:
    storage, out_path = sys.argv[1:3]
    for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                       "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "RAY_DEDUP_LOGS": "0"}.items():
        os.environ.setdefault(key, value)
    fetch_log = Path(storage) / "fetch.log"
    Path(storage).mkdir(parents=True, exist_ok=True)
    os.environ["SELMIX_RAY_TEST_FETCH_LOG"] = str(fetch_log)
    import ray
    from ray.cluster_utils import Cluster

    from selmix_ray.features import build_features
    from selmix_ray.sweep import search

    # Node death is noticed after health_check_period_ms * failure_threshold (default 3 s * 5).
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": STORE_BYTES, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4}})
    workers = {}
    for _ in range(2):
        node = cluster.add_node(num_cpus=1, object_store_memory=STORE_BYTES)
        workers[node.node_id] = node
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    out = {"head": cluster.head_node.node_id, "workers": sorted(workers), "removed": None}
    features = build_features("digits", rho=10, backbone="identity")

    def remove_a_worker_mid_trial() -> None:
        while out["removed"] is None:
            time.sleep(0.1)
            running = {record["node"]: record for record in _records(fetch_log)}  # the last trial started there
            for record in running.values():
                checkpoints = _checkpoints(Path(storage) / "multinode", record["trial"])
                if record["node"] in workers and MIN_CHECKPOINTS <= checkpoints <= MAX_CHECKPOINTS:
                    cluster.remove_node(workers[record["node"]], allow_graceful=False)
                    out["removed"] = {"node": record["node"], "trial": record["trial"],
                                      "checkpoints_seen": checkpoints}
                    return

    remover = threading.Thread(target=remove_a_worker_mid_trial, daemon=True)
    remover.start()
    started = time.monotonic()
    search(SPACE, features=features, storage=storage, name="multinode", num_samples=NUM_SAMPLES, max_concurrent=3,
           seed=0, checkpoint_every=2, scheduler="fifo")
    out["sweep_s"] = time.monotonic() - started
    Path(out_path).write_text(json.dumps(out))
    ray.shutdown()
    cluster.shutdown()


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _checkpoints(experiment: Path, trial_id: str) -> int:
    """How many checkpoint folders the trial has written to the shared storage so far."""
    return sum(1 for _ in experiment.glob(f"run_trial_{trial_id}_*/checkpoint_*"))


if __name__ == "__main__":
    main()
