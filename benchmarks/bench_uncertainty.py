"""Time the bootstrap intervals of ``selmix_ray.uncertainty`` and measure their coverage where the truth is known.

    .venv/bin/python benchmarks/bench_uncertainty.py                      # timing + coverage tables
    .venv/bin/python benchmarks/bench_uncertainty.py --simulations 200 --skip-large

Timing: 200 trials x (val + test) x B = 1000 at K = 10 (50 val / 150 test images per class), every
interval computed from scratch, per objective; then one interval at K = 1000 with 20 images per class
(ImageNet-LT's validation size). Wall and CPU seconds: numpy runs these single-threaded, so CPU seconds are
what an idle core would take when the machine is shared.

Coverage: a synthetic classifier with known per-class confusion probabilities P (K = 10; row k is class
k's distribution of predictions) is scored on a fresh validation draw (n_val images per class) and a fresh
test draw (n_test per class) in every simulation. For each objective and nominal 90%:
  - ``pct``/``basic``: how often the percentile / basic confidence interval from the validation draw covers
    the TRUE value (the objective of the expected confusion diag(pi) P, pi the per-class share);
  - ``pct->test``: how often the test value falls inside the validation confidence interval (percentile);
  - ``pred->test``: how often it falls inside the validation prediction interval for a sample of the test
    sizes (``kind="prediction"``), the interval made for that question;
  - ``bias``: mean (validation value - true value), the bias of the point estimate itself.
Verdicts: how often ``verdict(compare(...))`` says better / indistinguishable / worse for a trial equal to
the baseline (false alarms) and one whose every recall is 0.05 higher (power).

Pairing: the width of the 90% interval of the difference, unpaired (counts) against paired (per-image
predictions), for a trial that re-decides 10% of the baseline's images.

Selection: the true min recall of the candidate each rule of ``verdicts.SELECTION_RULES`` picks among
60 synthetic candidates scored on fresh validation draws.

Two classifiers: ``spread`` (recalls evenly spread from 0.55 to 0.95, errors drawn towards the head
classes, as after long-tailed training) and ``flat`` (every recall 0.80: a minimum of ten tied noisy
recalls, the hardest case for min recall).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from selmix_ray.metrics import confusion_counts
from selmix_ray.objectives import OBJECTIVES, get_objective
from selmix_ray.uncertainty import (
    bootstrap,
    interval,
)
from selmix_ray.verdicts import (
    SELECTION_RULES,
    compare,
    compare_paired,
    select,
    verdict,
)

LEVEL = 0.90


def classifier(kind: str, K: int, seed: int = 0) -> np.ndarray:
    """(K, K) per-class prediction probabilities P (rows sum to 1, rows = true class)."""
    rng = np.random.default_rng(seed)
    recall = np.linspace(0.95, 0.55, K) if kind == "spread" else np.full(K, 0.80)
    head_pull = np.linspace(3.0, 0.3, K)  # errors go to head classes more often
    P = np.zeros((K, K))
    for k in range(K):
        weights = rng.dirichlet(head_pull) if kind == "spread" else np.full(K, 1.0)
        weights[k] = 0.0
        P[k] = (1 - recall[k]) * weights / weights.sum()
        P[k, k] = recall[k]
    return P


def draw(P: np.ndarray, sizes: np.ndarray, rng) -> np.ndarray:
    """(K, K) counts: row k ~ Multinomial(sizes[k], P[k])."""
    return rng.multinomial(sizes, P)


def timing(objectives: list[str], *, trials: int, resamples: int) -> None:
    K = 10
    P = classifier("spread", K)
    rng = np.random.default_rng(0)
    confusions = [(draw(P, np.full(K, 50), rng), draw(P, np.full(K, 150), rng)) for _ in range(trials)]
    print(f"\n### Timing: {trials} trials x (val 50/class + test 150/class) x B = {resamples}, K = {K}\n")
    print("| objective | wall s | CPU s | CPU ms per interval |")
    print("|---|---:|---:|---:|")
    for name in objectives:
        objective = get_objective(name)
        start, start_cpu = time.perf_counter(), time.process_time()
        for index, (val, test) in enumerate(confusions):
            interval(val, objective, resamples=resamples, seed=index)
            interval(test, objective, resamples=resamples, seed=index)
        seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        print(f"| {name} | {seconds:.2f} | {cpu:.2f} | {1000 * cpu / (2 * trials):.2f} |")


def timing_large(objectives: list[str], *, resamples: int) -> None:
    K, n = 1000, 20
    rng = np.random.default_rng(0)
    P = np.zeros((K, K))
    for k in range(K):  # recall about 0.5, errors on 8 other classes
        others = rng.choice(np.delete(np.arange(K), k), size=8, replace=False)
        P[k, others] = rng.dirichlet(np.ones(8)) * 0.5
        P[k, k] = 0.5
    counts = draw(P, np.full(K, n), rng)
    print(f"\n### Timing: one interval at K = {K}, {n} images per class, B = {resamples}\n")
    print("| objective | wall s | CPU s | interval |")
    print("|---|---:|---:|---|")
    for name in objectives:
        objective = get_objective(name)
        start, start_cpu = time.perf_counter(), time.process_time()
        result = interval(counts, objective, resamples=resamples, seed=0)
        print(f"| {name} | {time.perf_counter() - start:.2f} | {time.process_time() - start_cpu:.2f} | {result} |")


def coverage(objectives: list[str], *, sizes: tuple[int, int], kind: str, simulations: int, resamples: int,
             seed: int) -> None:
    K = 10
    n_val, n_test = sizes
    P = classifier(kind, K)
    val_sizes, test_sizes = np.full(K, n_val), np.full(K, n_test)
    truth_counts = P * (val_sizes / val_sizes.sum())[:, None]  # expected joint confusion diag(pi) P
    print(f"\n### Coverage of nominal {LEVEL:.0%}: K = {K}, {n_val} val / {n_test} test images per class, "
          f"'{kind}' classifier, {simulations} simulations, B = {resamples}\n")
    print("| objective | true | bias | pct | basic | pct->test | pred->test | width pct | width pred |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    tail = (1 - LEVEL) / 2
    for name in objectives:
        objective = get_objective(name)
        truth = objective.value(truth_counts)
        rng = np.random.default_rng(seed)
        hits = {"pct": 0, "basic": 0, "pct->test": 0, "pred->test": 0}
        bias = width_pct = width_pred = 0.0
        for index in range(simulations):
            val, test = draw(P, val_sizes, rng), draw(P, test_sizes, rng)
            point, test_value = objective.value(val), objective.value(test)
            draws = bootstrap(val, objective, resamples=resamples, seed=index)
            low, high = np.quantile(draws, [tail, 1 - tail])
            predicted = interval(val, objective, kind="prediction", new_sizes=test_sizes, resamples=resamples,
                                 seed=index)
            hits["pct"] += low <= truth <= high
            hits["basic"] += 2 * point - high <= truth <= 2 * point - low
            hits["pct->test"] += low <= test_value <= high
            hits["pred->test"] += predicted.low <= test_value <= predicted.high
            bias += point - truth
            width_pct += high - low
            width_pred += predicted.high - predicted.low
        rates = " | ".join(f"{hits[key] / simulations:.2f}" for key in hits)
        print(f"| {name} | {truth:.3f} | {bias / simulations:+.3f} | {rates} | {width_pct / simulations:.3f} | "
              f"{width_pred / simulations:.3f} |")


def verdicts(objectives: list[str], *, n_val: int, simulations: int, resamples: int, seed: int) -> None:
    """How often the verdict says better / worse when the trial and the baseline are equally good (false
    alarms: nominal 5% each side at level 0.9) and when the trial's every recall is 0.05 higher (power)."""
    K = 10
    print(f"\n### Verdicts at level 0.9 (unpaired, independent validation draws, {n_val} images per class, "
          f"{simulations} simulations, B = {resamples})\n")
    print("| objective | classifier | trial truly | better | indistinguishable | worse |")
    print("|---|---|---|---:|---:|---:|")
    for name in objectives:
        objective = get_objective(name)
        for kind in ("spread", "flat"):
            baseline = classifier(kind, K)
            for gap in (0.0, 0.05):
                trial = baseline.copy()
                if gap:
                    diagonal = np.diag(baseline) + gap
                    trial = baseline * ((1 - diagonal) / (1 - np.diag(baseline)))[:, None]
                    trial[np.diag_indices(K)] = diagonal
                rng = np.random.default_rng(seed)
                kinds = {"better": 0, "indistinguishable": 0, "worse": 0}
                for index in range(simulations):
                    comparison = compare(draw(trial, np.full(K, n_val), rng), draw(baseline, np.full(K, n_val), rng),
                                         objective, resamples=resamples, seed=index)
                    kinds[verdict(comparison).kind] += 1
                label = "equal" if gap == 0 else f"+{gap:.2f} recall"
                rates = " | ".join(f"{count / simulations:.2f}" for count in kinds.values())
                print(f"| {name} | {kind} | {label} | {rates} |")


def pairing(objectives: list[str], *, n_val: int, simulations: int, resamples: int, seed: int) -> None:
    """Paired (per-image predictions) against unpaired (counts only) on the same validation images, for a
    trial that re-decides 10% of the baseline's images (90% of those become right, 10% wrong), as a
    post-hoc correction does: the unpaired interval ignores that the two agree on 90% of the images."""
    K = 10
    recall = np.linspace(0.95, 0.55, K)
    print(f"\n### Paired vs unpaired: trial = baseline with 10% of predictions re-decided, {n_val} images per "
          f"class, {simulations} simulations, B = {resamples}\n")
    print("| objective | true gain | width unpaired | width paired | 'better' unpaired | 'better' paired |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in objectives:
        objective = get_objective(name)
        rng = np.random.default_rng(seed)
        widths = {False: 0.0, True: 0.0}
        better = {False: 0, True: 0}
        for index in range(simulations):
            labels = np.repeat(np.arange(K), n_val)
            wrong = (labels + rng.integers(1, K, labels.size)) % K
            baseline = np.where(rng.random(labels.size) < recall[labels], labels, wrong)
            trial = baseline.copy()
            redo = rng.random(labels.size) < 0.10
            trial[redo] = np.where(rng.random(redo.sum()) < 0.9, labels[redo], wrong[redo])
            unpaired = compare(confusion_counts(labels, trial, K), confusion_counts(labels, baseline, K), objective,
                               resamples=resamples, seed=index)
            paired = compare_paired(labels, trial, baseline, objective, n_classes=K, resamples=resamples, seed=index)
            for key, comparison in ((False, unpaired), (True, paired)):
                widths[key] += comparison.high - comparison.low
                better[key] += verdict(comparison).kind == "better"
        # expected recall of the trial: 90% as the baseline, 10% right with probability 0.9
        gain_recall = 0.9 * recall + 0.1 * 0.9
        gain = objective.value(np.diag(gain_recall) + np.diag(1 - gain_recall) @ (1 - np.eye(K)) / (K - 1)) - \
            objective.value(np.diag(recall) + np.diag(1 - recall) @ (1 - np.eye(K)) / (K - 1))
        print(f"| {name} | {gain:+.3f} | {widths[False] / simulations:.3f} | {widths[True] / simulations:.3f} | "
              f"{better[False] / simulations:.2f} | {better[True] / simulations:.2f} |")


def selection(*, candidates: int, n_val: int, simulations: int, resamples: int, seed: int) -> None:
    """Each simulation scores ``candidates`` synthetic classifiers (K = 10, known recalls: a level between
    0.70 and 0.85 plus a class profile whose spread, 0.01 to 0.08, sets how tied the minimum is) on fresh
    validation draws and lets every rule pick one; the table gives the true min recall of the pick."""
    K = 10
    rng = np.random.default_rng(seed)
    recalls = np.clip(rng.uniform(0.70, 0.85, size=(candidates, 1))
                      + rng.uniform(0.01, 0.08, size=(candidates, 1)) * rng.normal(size=(candidates, K)), 0.3, 0.99)
    truth = recalls.min(axis=1)
    classifiers = [((1 - r) / (K - 1))[:, None] * (1 - np.eye(K)) + np.diag(r) for r in recalls]
    objective = get_objective("min_recall")
    picked = {rule: [] for rule in SELECTION_RULES}
    for index in range(simulations):
        counts = {t: draw(P, np.full(K, n_val), rng) for t, P in enumerate(classifiers)}
        for rule in SELECTION_RULES:
            picked[rule].append(truth[select(counts, objective, rule=rule, resamples=resamples, seed=index)])
    print(f"\n### Selection rules: {candidates} synthetic candidates, K = {K}, {n_val} val images per class, "
          f"{simulations} simulations, B = {resamples}; best true min recall {truth.max():.3f}, "
          f"median {np.median(truth):.3f}\n")
    print("| rule | true min recall of the pick (mean) | regret vs the best (mean) | picked the best |")
    print("|---|---:|---:|---:|")
    for rule, values in picked.items():
        values = np.asarray(values)
        print(f"| {rule} | {values.mean():.3f} | {truth.max() - values.mean():.3f} | "
              f"{np.mean(values == truth.max()):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--simulations", type=int, default=400, help="simulated val/test draws per cell")
    parser.add_argument("--resamples", type=int, default=1000, help="B")
    parser.add_argument("--trials", type=int, default=200, help="trials in the timing run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-large", action="store_true", help="skip the K = 1000 timing")
    parser.add_argument("--skip-coverage", action="store_true")
    parser.add_argument("--selection-simulations", type=int, default=100, help="0 skips the selection table")
    parser.add_argument("--verdict-simulations", type=int, default=300, help="0 skips the verdict table")
    args = parser.parse_args()
    names = sorted(set(OBJECTIVES) - {"custom"})
    timing(["min_recall", "hmean", "mean_recall_min_coverage"], trials=args.trials, resamples=args.resamples)
    if not args.skip_large:
        timing_large(["min_recall", "hmean", "mean_recall_min_coverage"], resamples=args.resamples)
    if args.verdict_simulations:
        for n_val in (50, 20):
            verdicts(["min_recall", "hmean", "mean_recall"], n_val=n_val, simulations=args.verdict_simulations,
                     resamples=args.resamples, seed=args.seed)
    if args.verdict_simulations:
        pairing(["min_recall", "mean_recall"], n_val=50, simulations=args.verdict_simulations // 3,
                resamples=args.resamples, seed=args.seed)
    if args.selection_simulations:
        for n_val in (50, 20):
            selection(candidates=60, n_val=n_val, simulations=args.selection_simulations,
                      resamples=args.resamples, seed=args.seed)
    if args.skip_coverage:
        return
    for sizes in ((50, 150), (20, 50)):
        for kind in ("spread", "flat"):
            coverage(names, sizes=sizes, kind=kind, simulations=args.simulations, resamples=args.resamples,
                     seed=args.seed)


if __name__ == "__main__":
    main()
