"""The semi-supervised table (issue 10 item 5): MNIST-LT with an unlabeled pool; prints markdown.

    python benchmarks/bench_semisup.py --seeds 0-9 --out semisup.json          # the ten-seed table
    python benchmarks/bench_semisup.py --report semisup.json                   # reprint from stored results
    python benchmarks/bench_semisup.py --seeds 100-104 --threshold 0.9         # explore on other seeds
    python benchmarks/bench_semisup.py --seeds 0-9 --sweep-trials 8 --sweep-steps 1000 --out sweep.json
                                                                               # "after a sweep" rows

Data: the bundled MNIST subset (500 images per class), balanced validation and test (50 and 150 per
class, as everywhere in the README), a labeled split of rho = 100 with n_max = 150 (150 ... 1 per class:
the default n_max = 300 would leave class 0 nothing for a pool), and an unlabeled pool of the remaining
images with its own profile: uniform (rho_u = 1, 150 per class) or reversed (rho_u = 1/100, 1 ... 150 per
class, class 9 largest). The default CNN backbone is trained on the labeled split only (the pool never
reaches it), so "without the pool" is the same FeatureSet with the pool removed: the same backbone, the
same head, the same labeled split.

Rows, each one finetune run at the library's defaults (2000 steps; defaults chosen on seeds 100-104, never
on 0-9), or a baseline without training:

- start / post-hoc alone       : the starting head, without and with post-hoc class weights
- uniform mixup (+ post-hoc)   : method = uniform_mixup, with and without the pool
- SelMix (+ post-hoc)          : method = selmix, with and without the pool

With the pool, a pair (i, j)'s partner of class j is drawn from pool samples pseudo-labelled j (the pool's
true labels never reach training); the table also gives the pseudo-labels' accuracy per class (recall of
each true class and precision of each pseudo-label) at the start and at the end of the default SelMix run.
Test metrics are at each run's best validation report; ± is the standard deviation over seeds; the
paired difference column is (row − post-hoc alone) per seed, with its mean, its standard deviation and the
number of seeds where it is > 0 / < 0.

After a sweep (``--sweep-trials N``): for every seed, three real ``selmix_ray.sweep.search`` sweeps of N
trials each (ASHA, TPE, ``--max-concurrent`` at once, one Ray cluster for the whole process) over
:data:`SWEEP_SPACE` (method, posthoc, s, lr; objective min_recall; ``--sweep-steps`` steps per trial, the
library's defaults for everything else): on the FeatureSet with the uniform pool, with the reversed pool,
and without a pool (the same backbone, head and labeled split). Each row is the test min/mean recall of the
trial the experiment's selection rule picks (``Run.best``; rule "max" unless ``--select``), paired with
post-hoc alone on the same seed, and how often the pick's best validation report is its step-0 report
(the starting head: for a trial with posthoc class_weights that report is exactly post-hoc alone, since
ties keep the earliest report). Nothing in the space or the defaults was tuned on the reported seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# One thread for BLAS and torch, as Ray gives a 1-CPU trial (OMP_NUM_THREADS=1); set before numpy loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import parse_seeds  # noqa: E402

from selmix_ray.engine import FinetuneConfig, Trainer  # noqa: E402

POOLS = {"uniform pool (rho_u = 1)": 1.0, "reversed pool (rho_u = 1/100)": 0.01}
N_MAX, N_MAX_POOL = 150, 150
TRAINED = {  # row -> config overrides; each is run without and with the pool
    "uniform mixup": {"method": "uniform_mixup"},
    "uniform mixup + post-hoc": {"method": "uniform_mixup", "posthoc": "class_weights"},
    "SelMix": {"method": "selmix"},
    "SelMix + post-hoc": {"method": "selmix", "posthoc": "class_weights"},
}
BASELINES = {"start": {"steps": 0}, "post-hoc alone": {"steps": 0, "posthoc": "class_weights"}}
REFERENCE = "post-hoc alone"
# "After a sweep": the space every seed's three sweeps search (the layout of search_spaces/*.yaml); steps are
# set by --sweep-steps, everything not listed is the library's default.
SWEEP_SPACE = {
    "objective": "min_recall",
    "space": {
        "method": {"choice": ["selmix", "uniform_mixup"]},
        "posthoc": {"choice": ["none", "class_weights"]},
        "s": {"loguniform": [0.1, 100], "when": {"method": "selmix"}},
        "lr": {"loguniform": [0.1, 10]},
    },
    "fixed": {"eval_every": 50},
}
SWEEP_ROWS = {"sweep, uniform pool": 1.0, "sweep, reversed pool": 0.01, "sweep, no pool": None}


def pool_features(seed: int, rho_u: float, cache_dir):
    from selmix_ray.features import build_features
    return build_features("mnist", rho=100, seed=seed, cache_dir=cache_dir, progress=False, n_max=N_MAX,
                          rho_unlabeled=rho_u, n_max_unlabeled=N_MAX_POOL)


def pseudo_label_accuracy(pseudo: np.ndarray, truth: np.ndarray, K: int) -> dict[str, list[float]]:
    """Per class: recall of each true class (share of its pool samples labelled right) and precision of
    each pseudo-label (share of the samples given it that are truly of it); NaN where undefined."""
    recall = [float(np.mean(pseudo[truth == k] == k)) if np.any(truth == k) else float("nan") for k in range(K)]
    precision = [float(np.mean(truth[pseudo == k] == k)) if np.any(pseudo == k) else float("nan")
                 for k in range(K)]
    return {"recall": recall, "precision": precision, "labelled": float(np.mean(pseudo >= 0))}


def run_one(features, overrides: dict, seed: int, threshold: float) -> tuple[dict, dict | None]:
    """(test metrics at the best validation report, pseudo-label accuracy at start and end or None)."""
    config = FinetuneConfig.from_dict({"device": "cpu", "seed": seed, "pseudo_label_threshold": threshold,
                                       **overrides})
    trainer = Trainer(features, config)
    pseudo = {}
    for step in trainer.pending_report_steps():
        trainer.run_until(step)
        if trainer.pseudo_labels is not None and "start" not in pseudo:
            pseudo["start"] = pseudo_label_accuracy(trainer.pseudo_labels, features.unlabeled_true_y,
                                                    features.n_classes)
    if trainer.pseudo_labels is not None:
        pseudo["end"] = pseudo_label_accuracy(trainer.pseudo_labels, features.unlabeled_true_y, features.n_classes)
    last = trainer.history.metrics[-1]
    scores = {"min_recall": last["test_at_best/min_recall"], "mean_recall": last["test_at_best/mean_recall"]}
    return scores, pseudo or None


def run_seed(seed: int, args) -> dict:
    """Every row for one seed and both pools: {pool: {row: {"min_recall", "mean_recall"}}, "pseudo": ...}."""
    out: dict = {"seed": seed, "pools": {}, "pseudo": {}}
    for pool_name, rho_u in POOLS.items():
        features = pool_features(seed, rho_u, args.cache_dir)
        no_pool = dataclasses.replace(features, unlabeled=None, unlabeled_true_y=None)
        rows = {}
        for name, overrides in BASELINES.items():
            rows[name] = run_one(no_pool, overrides, seed, args.threshold)[0]
        for name, overrides in TRAINED.items():
            rows[f"{name}, no pool"] = run_one(no_pool, overrides, seed, args.threshold)[0]
            rows[f"{name}, with pool"], pseudo = run_one(features, overrides, seed, args.threshold)
            if name == "SelMix":
                out["pseudo"][pool_name] = pseudo
        out["pools"][pool_name] = rows
    return out


def sweep_seed(seed: int, args) -> dict:
    """The three sweeps of one seed (uniform pool, reversed pool, no pool): the test metrics of the trial the
    selection rule picks, its config, and post-hoc alone / start on the same seed as reference."""
    from selmix_ray.results import load_run
    from selmix_ray.sweep import search

    space = json.loads(json.dumps(SWEEP_SPACE))
    space["fixed"].update(steps=args.sweep_steps, pseudo_label_threshold=args.threshold)
    uniform = pool_features(seed, 1.0, args.cache_dir)
    no_pool = dataclasses.replace(uniform, unlabeled=None, unlabeled_true_y=None)
    out: dict = {"seed": seed, "reference": {}, "rows": {}}
    for name, overrides in BASELINES.items():
        out["reference"][name] = run_one(no_pool, overrides, seed, args.threshold)[0]
    for row, rho_u in SWEEP_ROWS.items():
        features = no_pool if rho_u is None else (uniform if rho_u == 1.0 else pool_features(seed, rho_u,
                                                                                            args.cache_dir))
        name = f"semisup-seed{seed}-" + row.split(", ")[1].replace(" ", "-")
        path = Path(args.storage) / name
        started = time.perf_counter()
        if (path / "selmix_run.json").exists():
            run = load_run(path)
        else:
            run = search(space, features=features, storage=args.storage, name=name, num_samples=args.sweep_trials,
                         max_concurrent=args.max_concurrent, seed=seed, select=args.select)
        best = run.best
        out["rows"][row] = {
            "min_recall": float(best["test_at_best/min_recall"]),
            "mean_recall": float(best["test_at_best/mean_recall"]),
            "val": float(best["val/best_objective"]), "trial_id": best["trial_id"],
            "method": best.get("config/method"), "posthoc": best.get("config/posthoc"),
            "best_step": run.history(best["trial_id"]).best_step,
            "trials": int(run.df["val/best_objective"].notna().sum()), "select": run.select,
            "seconds": time.perf_counter() - started,
        }
        print(f"seed {seed} {row}: {out['rows'][row]}", file=sys.stderr, flush=True)
    return out


def _t_interval(diff: np.ndarray) -> str:
    """95% t interval of the mean of paired differences over seeds."""
    from scipy import stats

    if len(diff) < 2:
        return "–"
    half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
    return f"[{diff.mean() - half:+.3f}, {diff.mean() + half:+.3f}]"


def print_sweep_table(results: list[dict], meta: dict) -> None:
    seeds = [r["seed"] for r in results]
    print(f"\nmnist rho=100 (n_max = {N_MAX}), default CNN, seeds {seeds[0]}-{seeds[-1]} ({len(seeds)} seeds), "
          f"after a sweep: {meta['trials']} trials x {meta['steps']} steps per sweep (ASHA, TPE, "
          f"max_concurrent {meta['max_concurrent']}), pseudo_label_threshold = {meta['threshold']}; the trial "
          f"the selection rule ({results[0]['rows'][next(iter(SWEEP_ROWS))]['select']}) picks on validation; "
          "test metrics at its best validation report\n")
    print(f"| row | test min recall | test mean recall | min recall − {REFERENCE} (paired) | > / < | "
          "95% CI of the mean difference (t) | picked: selmix / uniform_mixup, + post-hoc | "
          "picked report at step 0 |")
    print("|---|---|---|---|---|---|---|---|")
    reference = np.array([r["reference"][REFERENCE]["min_recall"] for r in results])
    for name in BASELINES:
        mins = np.array([r["reference"][name]["min_recall"] for r in results])
        means = [r["reference"][name]["mean_recall"] for r in results]
        print(f"| {name} | {_stats(mins)} | {_stats(means)} | | | | | |")
    for row in SWEEP_ROWS:
        picks = [r["rows"][row] for r in results]
        mins = np.array([p["min_recall"] for p in picks])
        diff = mins - reference
        methods = [p["method"] for p in picks]
        print(f"| {row} | {_stats(mins)} | {_stats([p['mean_recall'] for p in picks])} | {diff.mean():+.3f} ± "
              f"{diff.std(ddof=1) if len(diff) > 1 else 0.0:.3f} | "
              f"{int(np.sum(diff > 1e-9))} / {int(np.sum(diff < -1e-9))} | {_t_interval(diff)} | "
              f"{methods.count('selmix')} / {methods.count('uniform_mixup')}, "
              f"{sum(p['posthoc'] == 'class_weights' for p in picks)} | "
              f"{sum(p.get('best_step') == 0 for p in picks)} |")
    for pool in ("uniform pool", "reversed pool"):
        diff = np.array([r["rows"][f"sweep, {pool}"]["min_recall"] - r["rows"]["sweep, no pool"]["min_recall"]
                         for r in results])
        print(f"\nsweep with the {pool} − sweep without (paired, min recall): {diff.mean():+.3f} ± "
              f"{diff.std(ddof=1) if len(diff) > 1 else 0.0:.3f} ({int(np.sum(diff > 1e-9))} > / "
              f"{int(np.sum(diff < -1e-9))} <), 95% CI of the mean {_t_interval(diff)}")


def run_sweeps(args) -> None:
    """The "after a sweep" rows: one Ray cluster for the process, three sweeps per seed, JSON after each seed."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    import ray

    args.storage = args.storage or tempfile.mkdtemp(prefix="selmix-semisup-")
    meta = {"mode": "sweep", "trials": args.sweep_trials, "steps": args.sweep_steps,
            "max_concurrent": args.max_concurrent, "threshold": args.threshold, "storage": str(args.storage)}
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    started = time.perf_counter()
    results = _each_seed(sweep_seed, args, meta)
    ray.shutdown()
    print_sweep_table(results, meta)
    print(f"\nwall time {time.perf_counter() - started:.0f} s")


def _stats(values: list[float]) -> str:
    array = np.asarray(values, float)
    return f"{array.mean():.3f} ± {array.std(ddof=1) if len(array) > 1 else 0.0:.3f}"


def print_tables(results: list[dict], threshold: float) -> None:
    seeds = [r["seed"] for r in results]
    print(f"\nmnist rho=100 (n_max = {N_MAX}), default CNN, seeds {seeds[0]}-{seeds[-1]} ({len(seeds)} seeds), "
          f"one default run per row and seed (2000 steps), pseudo_label_threshold = {threshold}; "
          "test metrics at the best validation report\n")
    for pool_name in POOLS:
        rows = results[0]["pools"][pool_name]
        print(f"\n**{pool_name}**\n")
        print(f"| row | test min recall | test mean recall | min recall − {REFERENCE} (paired) | > / < |")
        print("|---|---|---|---|---|")
        reference = np.array([r["pools"][pool_name][REFERENCE]["min_recall"] for r in results])
        for row in rows:
            mins = np.array([r["pools"][pool_name][row]["min_recall"] for r in results])
            means = [r["pools"][pool_name][row]["mean_recall"] for r in results]
            diff = mins - reference
            print(f"| {row} | {_stats(mins)} | {_stats(means)} | {diff.mean():+.3f} ± "
                  f"{diff.std(ddof=1) if len(diff) > 1 else 0.0:.3f} | "
                  f"{int(np.sum(diff > 1e-9))} / {int(np.sum(diff < -1e-9))} |")
    print("\n**Pseudo-labels of the pool (default SelMix run), mean over seeds, per class 0 … 9**\n")
    print("| pool | when | labelled | recall of each true class | precision of each pseudo-label |")
    print("|---|---|---|---|---|")
    for pool_name in POOLS:
        for when in ("start", "end"):
            parts = [r["pseudo"][pool_name][when] for r in results]
            recall = np.nanmean([p["recall"] for p in parts], axis=0)
            precision = np.nanmean([p["precision"] for p in parts], axis=0)
            labelled = np.mean([p["labelled"] for p in parts])
            print(f"| {pool_name} | {when} | {labelled:.2f} | {' '.join(f'{v:.2f}' for v in recall)} | "
                  f"{' '.join(f'{v:.2f}' for v in precision)} |")


def _each_seed(run, args, meta: dict) -> list:
    """``run(seed, args)`` for every seed, in order; ``meta`` plus the results so far go to ``args.out``
    after each seed (a long run keeps what finished)."""
    results, started = [], time.perf_counter()
    for seed in args.seeds:
        results.append(run(seed, args))
        print(f"seed {seed} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        if args.out:
            with open(args.out, "w") as handle:
                json.dump({**meta, "results": results}, handle, indent=1)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=parse_seeds, default=list(range(10)), help="e.g. 0-9 or 100-104")
    parser.add_argument("--threshold", type=float, default=0.0, help="pseudo_label_threshold of every run")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default=None, help="JSON of every seed's results (written after each seed)")
    parser.add_argument("--report", default=None, help="print the tables of a stored --out file and stop")
    parser.add_argument("--sweep-trials", type=int, default=None,
                        help="after a sweep: trials per sweep (three sweeps per seed); only these rows are run")
    parser.add_argument("--sweep-steps", type=int, default=1000, help="after a sweep: SGD steps per trial")
    parser.add_argument("--max-concurrent", type=int, default=2, help="after a sweep: trials at once")
    parser.add_argument("--select", default=None, help="after a sweep: selection rule (max, lcb); default max")
    parser.add_argument("--storage", default=None, help="after a sweep: experiments folder (existing sweeps "
                        "of the same name are read back, not rerun); default a temporary one")
    args = parser.parse_args()
    if args.report:
        stored = json.loads(open(args.report).read())
        if stored.get("mode") == "sweep":
            print_sweep_table(stored["results"], stored)
        else:
            print_tables(stored["results"], stored["threshold"])
        return
    torch.set_num_threads(1)
    if args.sweep_trials:
        run_sweeps(args)
        return
    started = time.perf_counter()
    results = _each_seed(run_seed, args, {"threshold": args.threshold})
    print_tables(results, args.threshold)
    print(f"\nwall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
