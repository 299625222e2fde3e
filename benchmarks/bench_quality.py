"""Sweep-level quality on MNIST-LT (issue 5): what a tuned sweep buys over post-hoc class weights alone.

    python benchmarks/bench_quality.py --seeds 0-9 --num-samples 60       # the full table (hours on 2 cores)
    python benchmarks/bench_quality.py --seeds 0-2 --num-samples 16       # a small version
    python benchmarks/bench_quality.py --seeds 0-9 --num-samples 20 --repeats 3   # same compute, less noise

For every seed: build mnist rho=100 features with the default CNN (seeded split and backbone), run one
min_recall sweep of ``--num-samples`` trials (search_spaces/min_recall.yaml: method, s, refresh_every, lr,
lambda_min, mixup, posthoc), and select on validation only (``val/best_objective``, the selection rule):

- best SelMix            : the best trial with method = selmix and posthoc = none
- best SelMix + post-hoc : the best trial with method = selmix and posthoc = class_weights
- best uniform + post-hoc: the best trial with method = uniform_mixup and posthoc = class_weights
- post-hoc alone         : the "start+class_weights" baseline (starting head, class weights)

and report each one's ``test_at_best/min_recall`` and ``test_at_best/mean_recall`` (mean, std, wins per
seed). Nothing is tuned on test. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import parse_seeds

ROOT = Path(__file__).resolve().parents[1]
ROWS = {
    "best SelMix": {"config/method": "selmix", "config/posthoc": "none"},
    "best SelMix + post-hoc": {"config/method": "selmix", "config/posthoc": "class_weights"},
    "best uniform mixup + post-hoc": {"config/method": "uniform_mixup", "config/posthoc": "class_weights"},
}
BASELINE = "start+class_weights"



def best_test(df, where: dict[str, str]) -> tuple[float, float] | None:
    """Test min and mean recall of the trial with the best validation score among those matching."""
    mask = df["val/best_objective"].notna()
    for column, value in where.items():
        mask &= df.get(column) == value
    chosen = df[mask]
    if chosen.empty:
        return None
    row = chosen.loc[chosen["val/best_objective"].idxmax()]
    return float(row["test_at_best/min_recall"]), float(row["test_at_best/mean_recall"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0-9", help="feature/split seeds, e.g. 0-9 or 0,3,5")
    parser.add_argument("--num-samples", type=int, default=60, help="trials per sweep")
    parser.add_argument("--repeats", type=int, default=1,
                        help="seeds trained per configuration, scored by their mean (search(repeats=...)); "
                             "compare --num-samples 60 with --num-samples 20 --repeats 3 at equal compute")
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "min_recall.yaml"))
    parser.add_argument("--storage", default=None, help="experiments folder (default: a temporary one)")
    parser.add_argument("--cache-dir", default=None, help="feature cache (default: the library's)")
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    import ray

    from selmix_ray.features import build_features
    from selmix_ray.sweep import search

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    storage = args.storage or tempfile.mkdtemp(prefix="selmix-quality-")
    results: dict[str, list[tuple[float, float] | None]] = {name: [] for name in [*ROWS, "post-hoc alone"]}
    seeds = parse_seeds(args.seeds)
    started = time.perf_counter()
    for seed in seeds:
        features = build_features("mnist", rho=100, seed=seed, cache_dir=args.cache_dir, progress=False)
        run = search(args.space, features=features, storage=storage, name=f"quality-seed{seed}-{int(time.time())}",
                     num_samples=args.num_samples, seed=seed, repeats=args.repeats)
        df = run.df
        for name, where in ROWS.items():
            results[name].append(best_test(df, where))
        metrics = run.baselines[BASELINE]["metrics"]
        results["post-hoc alone"].append(
            (metrics["test_at_best/min_recall"], metrics["test_at_best/mean_recall"]))
        line = ", ".join(f"{n}: {r[-1][0]:.3f}" if r[-1] else f"{n}: -" for n, r in results.items())
        print(f"seed {seed} ({time.perf_counter() - started:.0f} s): {line}", file=sys.stderr, flush=True)

    print(f"\nmnist rho=100, default CNN, seeds {args.seeds}, {args.num_samples} trials per sweep "
          f"(repeats {args.repeats}), "
          f"selected on validation; test numbers at the best validation report\n")
    print("| method | test min recall | test mean recall | wins (min recall) | seeds with such a trial |")
    print("|---|---|---|---|---|")
    for name, values in results.items():
        present = [v for v in values if v is not None]
        if not present:
            print(f"| {name} | - | - | - | 0 |")
            continue
        mins = [v[0] for v in present]
        means = [v[1] for v in present]
        wins = sum(
            1 for i in range(len(seeds))
            if values[i] is not None
            and values[i][0] >= max(r[i][0] for r in results.values() if r[i] is not None)
        )
        spread = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
        print(f"| {name} | {statistics.mean(mins):.3f} ± {spread(mins):.3f} | "
              f"{statistics.mean(means):.3f} ± {spread(means):.3f} | {wins}/{len(seeds)} | {len(present)} |")
    print(f"\nwall time {time.perf_counter() - started:.0f} s")
    ray.shutdown()


if __name__ == "__main__":
    main()
