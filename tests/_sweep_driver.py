"""Child-process driver for the kill/resume test: connects to the test session's Ray cluster and runs a
sweep until the test kills it with SIGKILL (a killed driver must not own the cluster: docs/architecture.md, Facts about Ray Tune 2.60 and Optuna 5).

    python tests/_sweep_driver.py ADDRESS STORAGE NAME NUM_SAMPLES SPACE_JSON [SEED [SCHEDULER [CHECKPOINT_EVERY]]]

Two trials at a time; SEED default 1, SCHEDULER default asha, CHECKPOINT_EVERY default search's.

Features: digits, rho 10, backbone "identity", cached under $XDG_CACHE_HOME (set by the test).
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    address, storage, name, num_samples, space_json = sys.argv[1:6]
    seed, scheduler, checkpoint_every = (sys.argv[6:] + ["1", "asha", "0"][len(sys.argv[6:]):])[:3]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    import ray

    from selmix_ray.features import build_features
    from selmix_ray.sweep import search

    ray.init(address=address, log_to_driver=False)
    features = build_features("digits", rho=10, backbone="identity")
    search(json.loads(space_json), features=features, storage=storage, name=name,
           num_samples=int(num_samples), max_concurrent=2, seed=int(seed), scheduler=scheduler,
           checkpoint_every=int(checkpoint_every) or None)


if __name__ == "__main__":
    main()
