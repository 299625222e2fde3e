"""How good are the frozen features for the tail? Start head vs post-hoc class weights, per seed.

    .venv/bin/python benchmarks/probe_features.py --seeds 100 101 102 103 104
    .venv/bin/python benchmarks/probe_features.py --seeds 100 101 --opts '{"width": 32, "epochs": 30}'

For each seed: build the features (``build_features(dataset, rho=..., seed=seed, **opts)``, cache in a
temporary folder unless ``--cache-dir``), take the backbone's own head as the start head, fit
``posthoc.fit_correction("class_weights", ...)`` for min recall on the validation logits, and report test
min recall and mean recall of both, the mean feature norm, and the build time (backbone training +
extraction; it depends on the machine's load, so compare configurations under the same conditions).

Choose defaults on seeds the README's quality table does not report (it uses 0-9): use 100 and up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np


def probe_one(dataset: str, rho: float, seed: int, opts: dict, cache_dir: str) -> dict:
    from selmix_ray.features import build_features
    from selmix_ray.metrics import confusion_counts, recalls
    from selmix_ray.objectives import get_objective
    from selmix_ray.posthoc import fit_correction

    started = time.perf_counter()
    fs = build_features(dataset, rho=rho, seed=seed, cache_dir=cache_dir, progress=False, **opts)
    build_s = time.perf_counter() - started
    K = fs.n_classes

    def logits(split):
        return np.asarray(split.x, np.float64) @ fs.weight.T.astype(np.float64) + fs.bias

    def scores(pred_logits, labels):
        r = recalls(confusion_counts(labels, pred_logits.argmax(1), K))
        return float(r.min()), float(r.mean())

    objective = get_objective("min_recall", train_counts=fs.train_counts)
    correction = fit_correction("class_weights", logits(fs.val), fs.val.y, objective, train_counts=fs.train_counts)
    start_min, start_mean = scores(logits(fs.test), fs.test.y)
    post_min, post_mean = scores(correction.apply(logits(fs.test)), fs.test.y)
    t = fs.metadata.get("timings", {})
    return {
        "seed": seed,
        "start_min": start_min,
        "start_mean": start_mean,
        "posthoc_min": post_min,
        "posthoc_mean": post_mean,
        "feature_norm": float(np.linalg.norm(np.asarray(fs.train.x, np.float64), axis=1).mean()),
        "dim": fs.dim,
        "build_s": build_s,
        "backbone_s": t.get("backbone_s"),
        "extract_s": t.get("extract_s"),
        "cache_hit": fs.metadata.get("cache_hit"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--rho", type=float, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102, 103, 104])
    parser.add_argument("--opts", default="{}", help="JSON dict of build_features options")
    parser.add_argument("--cache-dir", default=None, help="default: a fresh temporary folder (cold builds)")
    args = parser.parse_args()
    opts = json.loads(args.opts)
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="probe_features_")
    rows = []
    for seed in args.seeds:
        row = probe_one(args.dataset, args.rho, seed, opts, cache_dir)
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {key: statistics.mean(r[key] for r in rows)
               for key in ("start_min", "start_mean", "posthoc_min", "posthoc_mean", "feature_norm", "build_s")}
    print(json.dumps({"opts": opts, "seeds": args.seeds, "mean": {k: round(v, 4) for k, v in summary.items()}}))


if __name__ == "__main__":
    main()
