"""Sweep-level quality on MNIST-LT (issues 5 and 10): selection rules against post-hoc class weights alone,
and the coverage of the reported intervals.

    python benchmarks/bench_quality.py sweep --seeds 0-9 --num-samples 16 --steps 1000 --storage DIR  # sweeps, kept
    python benchmarks/bench_quality.py report --seeds 0-9 --storage DIR                   # tables, no training
    python benchmarks/bench_quality.py --seeds 0-2 --num-samples 16                       # both, a small version

``sweep``: for every seed, build mnist rho=100 features with the default CNN (seeded split and backbone)
and run one min_recall sweep (search_spaces/min_recall.yaml: method, s, refresh_every, lr, lambda_min,
mixup, posthoc) into ``DIR/quality-seed<seed>``. ``report`` reads them back (``load_run``) and prints:

1. the best trial of each kind on validation (rule max), as in earlier versions of this table;
2. per selection rule, the test min/mean recall of the trial (or baseline) it picks, from validation only,
   against the "start+class_weights" baseline (post-hoc class weights alone): the paired difference per
   seed (mean ± sd, seeds > / = / <, a two-sided sign test, a t interval of the mean) and, per seed, whether
   the test difference is beyond the noise of the test images (the paired 90% bootstrap interval of the
   difference on the stored per-image predictions excludes 0). Rules:
   - max: the highest val/best_objective (the library's default);
   - lcb: the highest val/lcb (the lower end of the 90% percentile interval, ``search(select="lcb")``);
   - max, gated: the max trial only if its P(beats the best baseline on validation) >= ``--gate``, else
     the best baseline on validation (a user who trusts the verdict keeps the baseline otherwise);
   - max / lcb over trials and baselines: the same rules with the baselines as candidates too.
3. coverage: for every trial and baseline at its selected report, whether the 90% validation interval
   (confidence, and prediction for 150 images per class) holds its test value; and, splitting the test
   images into two disjoint halves with half of every class (a seeded shuffle per class; the stored per-image
   predictions give each half's counts), whether a 90% interval computed on one half holds the value on the
   other half, both ways. A confidence interval is for the true value, so the other half's value (as noisy
   as the first) falls inside it less often than 90% even when the interval is right; the prediction
   interval (``interval(kind="prediction")``) is the one whose nominal rate for a fresh sample is 90%.

Nothing is chosen on test; the defaults were chosen on seeds 100-104, never on the seeds reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from _common import parse_seeds
from scipy import stats

from selmix_ray.baselines import baseline_predictions, stored_labels
from selmix_ray.constants import BASELINES_FILE, SCORE_KEY
from selmix_ray.metrics import confusion_counts
from selmix_ray.objectives import get_objective
from selmix_ray.pairing import compare_predictions
from selmix_ray.uncertainty import interval
from selmix_ray.verdicts import selection_scores

ROOT = Path(__file__).resolve().parents[1]
ROWS = {
    "best SelMix": {"config/method": "selmix", "config/posthoc": "none"},
    "best SelMix + post-hoc": {"config/method": "selmix", "config/posthoc": "class_weights"},
    "best uniform mixup + post-hoc": {"config/method": "uniform_mixup", "config/posthoc": "class_weights"},
}
BASELINE = "start+class_weights"



def best_test(df, where: dict[str, str]) -> tuple[float, float] | None:
    """Test min and mean recall of the trial with the best validation score among those matching."""
    mask = df[SCORE_KEY].notna()
    for column, value in where.items():
        mask &= df.get(column) == value
    chosen = df[mask]
    if chosen.empty:
        return None
    row = chosen.loc[chosen[SCORE_KEY].idxmax()]
    return float(row["test_at_best/min_recall"]), float(row["test_at_best/mean_recall"])


# -- selection rules ---------------------------------------------------------------------------------------


class Seed:
    """One seed's stored sweep: its trials' rows, the baselines, the labels, and predictions on demand."""

    def __init__(self, run):
        self.run = run
        self.df = run.df[run.df[SCORE_KEY].notna()].reset_index(drop=True)
        stored = json.loads((run.path / BASELINES_FILE).read_text())
        self.labels = {split: stored_labels(stored, split) for split in ("val", "test")}
        self.objective = get_objective("min_recall")
        self.K = int(self.labels["test"].max()) + 1

    def predictions(self, pick: str, split: str) -> np.ndarray:
        if pick in self.run.baselines:
            return baseline_predictions(self.run.baselines[pick], split)[0]
        history = self.run.history(pick)
        return (history.val_predictions if split == "val" else history.test_predictions)[0]

    def test_scores(self, pick: str) -> tuple[float, float]:
        if pick in self.run.baselines:
            metrics = self.run.baselines[pick]["metrics"]
        else:
            metrics = self.df.set_index("trial_id").loc[pick]
        return float(metrics["test_at_best/min_recall"]), float(metrics["test_at_best/mean_recall"])

    def counts(self, pick: str, split: str, index=None) -> np.ndarray:
        labels, predictions = self.labels[split], self.predictions(pick, split)
        if index is not None:
            labels, predictions = labels[index], predictions[index]
        return confusion_counts(labels, predictions, self.K)

    def best_baseline(self) -> str:
        return max(self.run.baselines, key=lambda name: self.run.baselines[name]["metrics"][SCORE_KEY])


def rule_picks(seed: Seed, gate: float) -> dict[str, str]:
    """The trial (or baseline) each rule selects, from validation only."""
    df = seed.df
    picks = {"max": df.loc[df[SCORE_KEY].idxmax(), "trial_id"], "lcb": df.loc[df["val/lcb"].idxmax(), "trial_id"]}
    best = df.loc[df[SCORE_KEY].idxmax()]
    picks[f"max, gated (P(beats best baseline on val) >= {gate})"] = (
        best["trial_id"] if best["p_beats_baseline"] >= gate else seed.best_baseline())
    candidates = {t: seed.counts(t, "val") for t in df["trial_id"]}
    candidates.update({name: seed.counts(name, "val") for name in seed.run.baselines})
    for rule in ("max", "lcb"):
        scores = selection_scores(candidates, seed.objective, rule=rule)
        picks[f"{rule} over trials and baselines"] = max(scores, key=scores.__getitem__)
    return picks


def rule_record(seed: Seed, seed_number: int, gate: float) -> dict:
    """Per rule: its pick's test min/mean recall and the paired test comparison with post-hoc alone."""
    out = {"reference": seed.test_scores(BASELINE), "rules": {}, "kinds": {}}
    reference = seed.predictions(BASELINE, "test")
    for rule, pick in rule_picks(seed, gate).items():
        comparison = compare_predictions(seed.labels["test"], seed.predictions(pick, "test"), reference,
                                         seed.objective, n_classes=seed.K, seed=seed_number)
        out["rules"][rule] = {"pick": pick, "baseline": pick in seed.run.baselines,
                              "test": seed.test_scores(pick), "low": comparison.low, "high": comparison.high}
    for name, where in ROWS.items():
        out["kinds"][name] = best_test(seed.df, where)
    return out


# -- coverage --------------------------------------------------------------------------------------------


def halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of the test images, each with half of every class (a seeded shuffle per class)."""
    rng = np.random.default_rng(seed)
    first, second = [], []
    for k in np.unique(labels):
        index = rng.permutation(np.flatnonzero(labels == k))
        first.append(index[: len(index) // 2])
        second.append(index[len(index) // 2:])
    return np.concatenate(first), np.concatenate(second)


def coverage_records(seed: Seed, seed_number: int, selected: set[str]) -> list[dict]:
    """For every trial and baseline: does its validation interval (confidence, prediction) hold its test
    value, and does a 90% interval from one half of test hold the value on the other half (both ways)?"""
    objective, level = seed.objective, 0.9
    test_sizes = np.bincount(seed.labels["test"], minlength=seed.K)
    first, second = halves(seed.labels["test"], seed_number)
    records = []
    for pick in [*seed.df["trial_id"], *seed.run.baselines]:
        val, test = seed.counts(pick, "val"), seed.counts(pick, "test")
        truth = float(objective.value(test))
        record = {"pick": pick, "baseline": pick in seed.run.baselines, "selected": pick in selected}
        for kind in ("confidence", "prediction"):
            band = interval(val, objective, level=level, kind=kind, new_sizes=test_sizes, seed=seed_number)
            record[f"val {kind}"] = band.low <= truth <= band.high
            hits = []
            for a, b in ((first, second), (second, first)):
                band = interval(seed.counts(pick, "test", a), objective, level=level, kind=kind, seed=seed_number)
                other = float(objective.value(seed.counts(pick, "test", b)))
                hits.append(band.low <= other <= band.high)
            record[f"half {kind}"] = hits
        records.append(record)
    return records


def run_sweeps(args) -> None:
    """One min_recall sweep per seed into ``--storage`` as ``quality-seed<seed>``; an existing one is kept."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    import ray

    from selmix_ray.features import build_features
    from selmix_ray.sweep import search

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    space = yaml.safe_load(Path(args.space).read_text())
    if args.steps is not None:  # a shorter fixed budget per trial (compute), the space otherwise unchanged
        space["fixed"]["steps"] = args.steps
    started = time.perf_counter()
    for seed in parse_seeds(args.seeds):
        name = f"quality-seed{seed}"
        if (Path(args.storage) / name / "selmix_run.json").exists():
            print(f"seed {seed}: {name} exists, kept", file=sys.stderr, flush=True)
            continue
        features = build_features("mnist", rho=100, seed=seed, cache_dir=args.cache_dir, progress=False)
        search(space, features=features, storage=args.storage, name=name, num_samples=args.num_samples,
               seed=seed, repeats=args.repeats)
        print(f"seed {seed} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    ray.shutdown()


# -- report --------------------------------------------------------------------------------------------------


def collect(args) -> list[dict]:
    """Per seed: the rule picks and the coverage records, from the stored sweeps (no training)."""
    from selmix_ray.results import load_run

    out = []
    for seed_number in parse_seeds(args.seeds):
        seed = Seed(load_run(Path(args.storage) / f"quality-seed{seed_number}"))
        record = rule_record(seed, seed_number, args.gate)
        selected = {r["pick"] for r in record["rules"].values()}
        record["coverage"] = coverage_records(seed, seed_number, selected)
        record["seed"], record["trials"] = seed_number, len(seed.df)
        record["steps"] = seed.run.manifest["space"]["fixed"]["steps"]
        out.append(record)
        print(f"seed {seed_number}: {len(seed.df)} trials read", file=sys.stderr, flush=True)
    return out


def _mean_sd(values) -> str:
    values = np.asarray(values, float)
    return f"{values.mean():.3f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.3f}"


def print_rules(records: list[dict]) -> None:
    reference = np.array([r["reference"] for r in records])
    print("| selection rule | test min recall | test mean recall | − post-hoc alone (min recall, mean ± sd "
          "over seeds) | seeds > / = / < | sign test p | 95% CI of the mean difference (t) | "
          "seeds beyond test noise, better / worse | picks a baseline |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| post-hoc class weights alone (reference) | {_mean_sd(reference[:, 0])} | "
          f"{_mean_sd(reference[:, 1])} | | | | | | |")
    for rule in records[0]["rules"]:
        picks = [r["rules"][rule] for r in records]
        test = np.array([p["test"] for p in picks])
        diff = test[:, 0] - reference[:, 0]
        ties = np.isclose(diff, 0.0, atol=1e-9)
        wins, losses = int(np.sum((diff > 0) & ~ties)), int(np.sum((diff < 0) & ~ties))
        sign_p = stats.binomtest(wins, wins + losses).pvalue if wins + losses else 1.0
        half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else 0.0
        better = sum(p["low"] > 0 for p in picks)
        worse = sum(p["high"] < 0 for p in picks)
        print(f"| {rule} | {_mean_sd(test[:, 0])} | {_mean_sd(test[:, 1])} | {_mean_sd(diff)} | "
              f"{wins} / {int(ties.sum())} / {losses} | {sign_p:.2f} | [{diff.mean() - half:+.3f}, "
              f"{diff.mean() + half:+.3f}] | {better} / {worse} | {sum(p['baseline'] for p in picks)} |")


def print_kinds(records: list[dict]) -> None:
    print("| best of its kind on validation (rule max) | test min recall | test mean recall | seeds with one |")
    print("|---|---|---|---|")
    for name in ROWS:
        present = [r["kinds"][name] for r in records if r["kinds"][name] is not None]
        if present:
            values = np.array(present)
            print(f"| {name} | {_mean_sd(values[:, 0])} | {_mean_sd(values[:, 1])} | {len(present)} |")


def print_coverage(records: list[dict]) -> None:
    groups = {
        "every trial": lambda c: not c["baseline"],
        "trials some rule selected": lambda c: c["selected"] and not c["baseline"],
        "baselines (no selection among reports)": lambda c: c["baseline"],
    }
    print("| intervals of | 90% val confidence interval holds the test value | 90% val prediction interval "
          "(for 150/class) holds the test value | 90% confidence interval on one test half holds the other "
          "half's value | 90% prediction interval on one half holds the other half's value | intervals |")
    print("|---|---|---|---|---|---|")
    for name, keep in groups.items():
        chosen = [c for r in records for c in r["coverage"] if keep(c)]
        if not chosen:
            continue
        shares = [np.mean([hit for c in chosen for hit in np.atleast_1d(c[key])])
                  for key in ("val confidence", "val prediction", "half confidence", "half prediction")]
        print(f"| {name} | {' | '.join(f'{v:.1%}' for v in shares)} | {len(chosen)} |")


def report(args) -> None:
    records = collect(args)
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1, default=float))
    seeds = [r["seed"] for r in records]
    print(f"\nmnist rho=100, default CNN, seeds {args.seeds} ({len(seeds)} seeds), "
          f"{records[0]['trials']} trials per sweep (min_recall.yaml, {records[0]['steps']} steps, ASHA); test numbers at the "
          f"best validation report; reference: the '{BASELINE}' baseline\n")
    print_kinds(records)
    print()
    print_rules(records)
    print()
    print_coverage(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["sweep", "report", "all"], nargs="?", default="all")
    parser.add_argument("--seeds", default="0-9", help="feature/split seeds, e.g. 0-9 or 0,3,5")
    parser.add_argument("--num-samples", type=int, default=60, help="trials per sweep")
    parser.add_argument("--repeats", type=int, default=1,
                        help="seeds trained per configuration, scored by their mean (search(repeats=...))")
    parser.add_argument("--steps", type=int, default=None, help="override the space's fixed steps per trial")
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "min_recall.yaml"))
    parser.add_argument("--storage", default=None, help="experiments folder (default: a temporary one)")
    parser.add_argument("--cache-dir", default=None, help="feature cache (default: the library's)")
    parser.add_argument("--gate", type=float, default=0.95,
                        help="the gated rule keeps the max trial only when P(beats best baseline) >= this")
    parser.add_argument("--out", default=None, help="report: also write every seed's numbers as JSON")
    args = parser.parse_args()
    args.storage = args.storage or tempfile.mkdtemp(prefix="selmix-quality-")
    if args.command in ("sweep", "all"):
        run_sweeps(args)
    if args.command in ("report", "all"):
        report(args)


if __name__ == "__main__":
    main()
