"""What storing per-image predictions costs, and what pairing buys (selmix_ray.pairing).

    python benchmarks/bench_pairing.py                                   # sizes, time, one MNIST-LT sweep
    python benchmarks/bench_pairing.py --seeds 0-4 --num-samples 16 --steps 1000 --dataset mnist --rho 100
    python benchmarks/bench_pairing.py --skip-sweep

1. Size added to a trial's history (``best_val_predictions`` + ``best_test_predictions``, JSON bytes) at
   K = 10 (MNIST-LT features, 500 validation and 1,500 test images, a real trial) and at K = 1000 with 20
   validation images per class (20,000 images; synthetic predictions, 60% right, errors uniform, images in
   a random order (as digits') or grouped by class (as MNIST's)), next to the history's own size.
2. Time added per report: encoding both fields (done at every checkpoint, ``History.to_json``) and the
   report itself for scale (the predictions are the arg-max the report computes anyway).
3. On real sweeps (``--dataset``, default mnist rho 100, the default backbone, search_spaces/min_recall.yaml
   with ``--steps``, FIFO, one sweep per seed of ``--seeds``): for every trial, the verdict against the best
   baseline on validation (and against "start", the starting head, where gains are large), unpaired
   (``verdicts.compare`` on counts) and paired (``pairing.paired_comparison`` on the stored predictions),
   for min recall (the sweep's objective) and mean recall; the number of "better" / "worse" verdicts and the
   mean width of the 90% interval of the difference, on validation and on test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import parse_seeds

ROOT = Path(__file__).resolve().parents[1]


def _timed(function, repeat: int = 20) -> float:
    """Median seconds of ``function()`` over ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def sizes_and_time(features) -> None:
    import torch

    from selmix_ray.engine import FinetuneConfig, Trainer
    from selmix_ray.history import History, encode_predictions

    torch.set_num_threads(1)
    for posthoc in ("none", "class_weights"):
        config = FinetuneConfig.from_dict({"steps": 200, "eval_every": 50, "posthoc": posthoc, "device": "cpu"})
        trainer = Trainer(features, config)
        for step in trainer.pending_report_steps():
            trainer.run_until(step)
        history = trainer.history
        bare = History(records=history.records, best_p=history.best_p, best_step=history.best_step,
                       meta=history.meta)
        size, added = len(bare.to_json()), len(history.to_json()) - len(bare.to_json())
        n_reports = len(history.records)
        encode = _timed(lambda h=history: [encode_predictions(h.best_val_predictions),
                                           encode_predictions(h.best_test_predictions)])
        report = _timed(trainer._report, repeat=5)  # appends records: only timed, the trainer is thrown away
        print(f"K={features.n_classes} n_val={len(features.val.y)} n_test={len(features.test.y)} "
              f"posthoc={posthoc}: +{added} bytes of JSON (history {size} bytes with {n_reports} reports); "
              f"encoding both {encode * 1e3:.2f} ms; one report {report * 1e3:.1f} ms")

    from selmix_ray.history import sparse_counts
    from selmix_ray.metrics import confusion_counts

    rng = np.random.default_rng(0)
    K, per_class = 1000, 20
    for order in ("random", "by class"):
        labels = np.repeat(np.arange(K), per_class)
        labels = rng.permutation(labels) if order == "random" else labels
        predictions = np.where(rng.random(labels.size) < 0.6, labels, rng.integers(0, K, labels.size))
        encoded = json.dumps(encode_predictions(predictions))
        counts = json.dumps(sparse_counts(confusion_counts(labels, predictions, K)))
        encode = _timed(lambda p=predictions: encode_predictions(p))
        print(f"K={K} n_val={labels.size}, images in {order} order: +{len(encoded)} bytes of JSON per split "
              f"(raw uint16 {2 * labels.size}); one report's sparse val counts are {len(counts)} bytes; "
              f"encoding {encode * 1e3:.2f} ms")


def sweep_verdicts(args) -> None:
    """One sweep per seed; the verdict counts summed over the seeds, against the best baseline and "start"."""
    import yaml

    from selmix_ray.features import build_features
    from selmix_ray.sweep import search

    space = yaml.safe_load((ROOT / "search_spaces" / "min_recall.yaml").read_text())
    space["fixed"]["steps"] = args.steps
    totals: dict[tuple, list] = {}
    for seed in parse_seeds(args.seeds):
        features = build_features(args.dataset, rho=args.rho, seed=seed)
        with tempfile.TemporaryDirectory(prefix="bench_pairing_") as storage:
            started = time.perf_counter()
            run = search(space, features=features, storage=storage, name="pairing", num_samples=args.num_samples,
                         seed=seed, scheduler="fifo")
            print(f"sweep: {args.dataset} rho={args.rho} seed={seed}, {len(run.df)} trials x {args.steps} steps "
                  f"in {time.perf_counter() - started:.0f} s")
            for key, tally in _tally(run).items():
                totals.setdefault(key, []).extend(tally)
    print(f"\n{args.dataset} rho={args.rho}, seeds {args.seeds}, {args.num_samples} trials per seed; 90% intervals "
          "of trial - baseline at each trial's best report (B = 1000)")
    print("| baseline | split | objective | better unpaired | better paired | worse unpaired | worse paired "
          "| mean width unpaired | mean width paired |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (baseline, split, name), tally in totals.items():
        n = len(tally)
        count = {(kind, p): sum(v[p][0] == kind for v in tally) for kind in ("better", "worse")
                 for p in ("unpaired", "paired")}
        widths = [np.mean([v[p][1] for v in tally]) for p in ("unpaired", "paired")]
        print(f"| {baseline} | {split} | {name} | {count['better', 'unpaired']} / {n} | {count['better', 'paired']} / {n} "
              f"| {count['worse', 'unpaired']} | {count['worse', 'paired']} | {widths[0]:.3f} | {widths[1]:.3f} |")


def _tally(run) -> dict[tuple, list]:
    """(baseline label, split, objective) -> per trial {"unpaired": (kind, width), "paired": (kind, width)}."""
    from selmix_ray.history import dense_counts
    from selmix_ray.objectives import get_objective
    from selmix_ray.pairing import best_baseline, paired_comparison
    from selmix_ray.verdicts import compare, verdict

    best = best_baseline(run.baselines)
    print(f"  best baseline on validation: {best} (val/best_objective "
          f"{run.baselines[best]['metrics']['val/best_objective']:.3f}); best trial "
          f"{run.df['val/best_objective'].max():.3f}")
    out: dict[tuple, list] = {}
    for label, baseline in (("best", best), ("start", "start")):
        record = run.baselines[baseline]
        for split in ("val", "test"):
            for name in ("min_recall", "mean_recall"):
                scorer = get_objective(name, train_counts=run.train_counts())
                rows = out.setdefault((label, split, name), [])
                for trial_id in run.df["trial_id"]:
                    history = run.history(trial_id)
                    base = dense_counts(record[split]["counts"], history.n_classes)
                    comparisons = {
                        "unpaired": compare(history.confusion(history.best_index(), split), base, scorer),
                        "paired": paired_comparison(run, trial_id, baseline=baseline, objective=name, split=split),
                    }
                    rows.append({kind: (verdict(c).kind, c.high - c.low) for kind, c in comparisons.items()})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--rho", type=float, default=100)
    parser.add_argument("--seeds", default="0", help="sweeps, one per seed: '0-4', '0,3'")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--skip-sweep", action="store_true")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from selmix_ray.features import build_features

    sizes_and_time(build_features(args.dataset, rho=args.rho, seed=parse_seeds(args.seeds)[0]))
    if not args.skip_sweep:
        sweep_verdicts(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
