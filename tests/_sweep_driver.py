"""Child-process driver for the kill/resume test: connects to the test session's Ray cluster and runs a
sweep until the test kills it with SIGKILL (a killed driver must not own the cluster: docs/architecture.md, Facts about Ray Tune 2.60 and Optuna 5).

    python tests/_sweep_driver.py ADDRESS STORAGE NAME NUM_SAMPLES SPACE_JSON [SEED [SCHEDULER [CHECKPOINT_EVERY
        [UPLOAD_DELAY_S]]]]

Two trials at a time; SEED default 1, SCHEDULER default asha, CHECKPOINT_EVERY default search's.
UPLOAD_DELAY_S (default 0): fault injection. Tune writes each experiment snapshot to the driver's staging
folder and then uploads its files to storage one by one in a background thread; this driver uploads the
trial list that long after the other files (the searcher's state, the trials' results), so that a kill
often lands between the two (a window of milliseconds otherwise, hit about once in 20 kills).

Features: digits, rho 10, backbone "identity", cached under $XDG_CACHE_HOME (set by the test).
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    address, storage, name, num_samples, space_json = sys.argv[1:6]
    seed, scheduler, checkpoint_every, upload_delay = (sys.argv[6:] + ["1", "asha", "0", "0"][len(sys.argv[6:]):])[:4]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    import ray

    from selmix_ray.features import build_features
    from selmix_ray.sweep import search

    if float(upload_delay) > 0:
        _delay_snapshot_uploads(float(upload_delay))
    ray.init(address=address, log_to_driver=False)
    features = build_features("digits", rho=10, backbone="identity")
    search(json.loads(space_json), features=features, storage=storage, name=name,
           num_samples=int(num_samples), max_concurrent=2, seed=int(seed), scheduler=scheduler,
           checkpoint_every=int(checkpoint_every) or None)


def _delay_snapshot_uploads(seconds: float) -> None:
    """Upload each of Tune's experiment snapshots in two parts, ``seconds`` apart: first every file but the
    trial list (``experiment_state-*.json``: the searcher's state, the trials' result files), then the
    trial list. A kill in between leaves what a kill during a real upload leaves (Tune copies the files one
    by one, in parallel), for longer. Trial workers, which upload checkpoints, are other processes."""
    import time

    from ray.train._internal import storage

    upload = storage._upload_to_fs_path

    def upload_in_two_parts(local_path, fs, fs_path, exclude=None):
        if os.path.isdir(local_path) and not exclude:
            upload(local_path, fs, fs_path, exclude=["experiment_state-*"])
            time.sleep(seconds)
        return upload(local_path, fs, fs_path, exclude=exclude)

    storage._upload_to_fs_path = upload_in_two_parts


if __name__ == "__main__":
    main()
