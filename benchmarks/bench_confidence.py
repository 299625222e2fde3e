"""What intervals, P(beats the best baseline) and the verdict cost a ``compare`` (selmix_ray.confidence).

    .venv/bin/python benchmarks/bench_confidence.py                  # 200 trials, K = 10, B = 1000
    .venv/bin/python benchmarks/bench_confidence.py --trials 50 --repeat 1

An experiment folder written by hand (tests/_experiment_files.py, no Ray, no training): ``--trials`` trials
of 10 reports each, K = 10 classes, 50 validation and 150 test images per class, per-image predictions at
each best report and five baselines (baselines.json format 3), as a sweep writes them; recalls drawn
uniformly in [0.5, 0.95] per class and report. Then, each from a fresh ``compare`` (nothing cached), the
median over ``--repeat`` runs of wall and CPU seconds of ``compare(path).to_string()``:

  - intervals off (``--no-intervals``), the reading alone;
  - intervals on: val and test intervals of every trial and baseline, val/lcb, P(beats the best baseline)
    paired on the stored predictions, the verdict (the issue's target: <= 3 s for 200 trials);
  - re-ranked (``objective="gmean"``: every trial's re-selected report, P unpaired where it moved);
  - an experiment without predictions (format 2: P unpaired from counts);
  - a sweep of a coverage-constrained objective (its bootstrap needs the column sums).

CPU seconds are what an idle core would take: numpy runs these single-threaded, and the machine the
numbers were taken on is shared.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _experiment_files import balanced_labels, predictions, write_experiment  # noqa: E402

from selmix_ray.comparison import compare  # noqa: E402

K, N_VAL, N_TEST, REPORTS = 10, 50, 150, 10


def experiment(path: Path, *, trials: int, objective: str = "min_recall", with_predictions: bool = True) -> Path:
    rng = np.random.default_rng(0)
    val, test = balanced_labels(K, N_VAL, seed=0), balanced_labels(K, N_TEST, seed=1)

    def classifier(seed: int):
        recall = rng.uniform(0.5, 0.95, K)
        return predictions(val, recall, seed=seed), predictions(test, recall, seed=seed + 1)

    runs = {f"t{i:04d}": [classifier(2 * (i * REPORTS + r)) for r in range(REPORTS)] for i in range(trials)}
    baselines = {name: classifier(10_000_000 + 2 * j)
                 for j, name in enumerate(["start", "start+logit_adjust", "start+class_weights", "erm", "mixup"])}
    return write_experiment(path, val_labels=val, test_labels=test, trials=runs, baselines=baselines,
                            objective=objective, with_predictions=with_predictions)


def timed(repeat: int, **options) -> tuple[float, float]:
    """Median (wall, CPU) seconds of a fresh compare(...).to_string()."""
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        compare(**options).to_string()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return float(np.median(walls)), float(np.median(cpus))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        paired = experiment(folder / "paired", trials=args.trials)
        old = experiment(folder / "old", trials=args.trials, with_predictions=False)
        coverage = experiment(folder / "coverage", trials=args.trials, objective="mean_recall_min_coverage")
        cases = [("intervals off", {"paths": paired, "intervals": False}),
                 ("intervals on (paired)", {"paths": paired}),
                 ("re-ranked: gmean", {"paths": paired, "objective": "gmean"}),
                 ("no predictions (unpaired)", {"paths": old}),
                 ("mean_recall_min_coverage", {"paths": coverage})]
        print(f"{args.trials} trials x {REPORTS} reports, K = {K}, {N_VAL} val / {N_TEST} test images per class, "
              f"B = 1000; median of {args.repeat}")
        print(f"{'case':<28}{'wall s':>8}{'CPU s':>8}")
        for name, options in cases:
            wall, cpu = timed(args.repeat, **options)
            print(f"{name:<28}{wall:>8.2f}{cpu:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
