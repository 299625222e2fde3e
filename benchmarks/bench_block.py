"""Benchmarks of top-block mode (issue 7 item 5, docs/method.md, Top-block mode); prints markdown.

    python benchmarks/bench_block.py speed                        # head-only vs top block vs full CNN in the loop
    python benchmarks/bench_block.py top_lr --seeds 100-104       # choose the default top_lr (not seeds 0-9)
    python benchmarks/bench_block.py quality --seeds 0-9          # quality table, head-only and block mode

Features: mnist, rho = 100, the default CNN cut before its last block (``cut="block"``; built once and
cached, ``--cache-dir`` picks the cache). Head-only rows use the same FeatureSet without its block, so both
modes see identical features. Every trial runs on one torch thread (what a 1-CPU Ray trial gets);
``--workers`` trials run at once in separate processes (default 2, this machine's cores).

"Full CNN in the loop" is the same engine in top-block mode with the cut at the input: the cached maps are
the (transformed) images and the "block" is the whole CNN (three conv stages; random weights, which
cost the same as trained ones), built through a backbone factory defined below.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import multiprocessing
import os
import time

# One thread for BLAS and torch, as Ray gives a 1-CPU trial (OMP_NUM_THREADS=1); set before numpy loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import parse_seeds  # noqa: E402

from selmix_ray.engine import FinetuneConfig, Trainer, finetune  # noqa: E402
from selmix_ray.errors import TrainingError  # noqa: E402
from selmix_ray.featureset import FeatureSet  # noqa: E402


def parse_floats(text: str) -> list[float]:
    """'1,10,100' -> [1.0, 10.0, 100.0]."""
    return [float(part) for part in text.split(",")]


def block_features(seed: int, cache_dir) -> FeatureSet:
    from selmix_ray.features import build_features

    return build_features("mnist", rho=100, backbone="cnn", cut="block", seed=seed, cache_dir=cache_dir,
                          progress=False)


def head_only(features: FeatureSet) -> FeatureSet:
    """The same arrays without the block payload: head-only fine-tuning on the same x."""
    return FeatureSet.from_dict({**features.to_dict(), "block": None})


def full_cnn_factory(*, n_classes: int, in_channels: int) -> dict:
    """Backbone factory: identity trunk, the whole default CNN as the "block" (images -> features (n, 64))."""
    from selmix_ray.backbones import SmallCNN

    cnn = SmallCNN(in_channels, n_classes)
    return {"trunk": torch.nn.Identity(), "block": torch.nn.Sequential(cnn.block1, cnn.block2, cnn.block3),
            "head": cnn.fc}


def full_features(seed: int, cache_dir) -> FeatureSet:
    from selmix_ray.features import build_features

    return build_features("mnist", rho=100, backbone="bench_block:full_cnn_factory", cut="block", seed=seed,
                          cache_dir=cache_dir, progress=False)


# -- speed ---------------------------------------------------------------------------------------------


def bench_speed(args) -> None:
    block = block_features(args.seed, args.cache_dir)
    modes = {"head only": head_only(block), "top block": block, "full CNN in the loop": full_features(
        args.seed, args.cache_dir)}
    steps = args.steps
    rows = {}
    for name, features in modes.items():
        # per step: SGD steps only (no refresh, no report inside the timed span)
        trainer = Trainer(features, FinetuneConfig(steps=steps, eval_every=steps, refresh_every=steps, device="cpu"))
        trainer.run_until(0)
        start = time.perf_counter()
        trainer.train_steps(steps)  # the steps alone: no refresh, no report
        per_step = (time.perf_counter() - start) / steps
        # per trial: the default trial (refresh every 10 steps, a report every 50), everything included
        config = FinetuneConfig(steps=steps, eval_every=50, device="cpu")
        start = time.perf_counter()
        finetune(features, config)
        per_trial = time.perf_counter() - start
        rows[name] = (per_step, per_trial)
        print(f"  {name}: {1e3 * per_step:.2f} ms/step, {per_trial:.1f} s/trial", flush=True)
    head, top, full = rows["head only"], rows["top block"], rows["full CNN in the loop"]
    maps = block.train.maps.shape[1:]
    print(f"\n### top-block cost, mnist rho=100, default CNN (block input {tuple(maps)}, d={block.dim}), "
          f"SelMix, batch 64, {steps} steps, 1 thread, one run\n")
    print("| loop | ms / SGD step | s / trial (refresh every 10, report every 50) |\n|---|---|---|")
    for name, (per_step, per_trial) in rows.items():
        print(f"| {name} | {1e3 * per_step:.2f} | {per_trial:.1f} |")
    print(f"\nratios: top block / head only = {top[0] / head[0]:.0f}x per step, {top[1] / head[1]:.0f}x per trial; "
          f"top block / full CNN = {top[0] / full[0]:.2f} per step, {top[1] / full[1]:.2f} per trial "
          "(target <= 0.10 per trial)")


# -- trials in worker processes --------------------------------------------------------------------------


def run_trial(job: dict) -> dict:
    """One trial (in a worker): ``job`` = {seed, mode, name, overrides, cache_dir}; returns its test numbers.

    The trial runs with ``posthoc="class_weights"``, which changes what is reported but not the training
    (the correction is fitted at reports only), so one trial gives both rows: with the correction (its
    ``test_at_best/*``) and without it (the report with the best ``val/raw/objective``, its ``test/raw/*``,
    selected as the engine selects: the first report that reached the best value).
    """
    torch.set_num_threads(1)
    features = block_features(job["seed"], job["cache_dir"])
    if job["mode"] == "head":
        features = head_only(features)
    config = FinetuneConfig.from_dict({"device": "cpu", "seed": job["seed"], **job["overrides"],
                                       "posthoc": "class_weights"})
    start = time.perf_counter()
    try:
        metrics = finetune(features, config).metrics
    except TrainingError as error:  # a diverged trial counts as NaN, the others go on
        nan = {"val": math.nan, "min_recall": math.nan, "mean_recall": math.nan}
        print(f"  seed {job['seed']} {job['name']}: diverged ({str(error)[:80]}...)", flush=True)
        return {**job, "seconds": time.perf_counter() - start, "posthoc": nan, "none": dict(nan)}
    raw_best = metrics[int(np.argmax([m["val/raw/objective"] for m in metrics]))]  # argmax: the first maximum
    last = metrics[-1]
    return {**job, "seconds": time.perf_counter() - start,
            "posthoc": {"val": last["val/best_objective"], "min_recall": last["test_at_best/min_recall"],
                        "mean_recall": last["test_at_best/mean_recall"]},
            "none": {"val": raw_best["val/raw/objective"], "min_recall": raw_best["test/raw/min_recall"],
                     "mean_recall": raw_best["test/raw/mean_recall"]}}


def run_jobs(jobs: list[dict], workers: int) -> list[dict]:
    results = []
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [pool.submit(run_trial, job) for job in jobs]
        for future in concurrent.futures.as_completed(futures):
            r = future.result()
            results.append(r)
            print(f"  seed {r['seed']} {r['mode']:5s} {r['name']:20s} " + "; ".join(
                f"{kind}: val {r[kind]['val']:.3f} test min {r[kind]['min_recall']:.3f} mean "
                f"{r[kind]['mean_recall']:.3f}" for kind in ("none", "posthoc")) + f" ({r['seconds']:.0f} s)",
                flush=True)
    return results


def summary(values) -> str:
    values = np.asarray(values)
    return f"{values.mean():.3f} ± {values.std(ddof=1) if len(values) > 1 else 0:.3f}"


# -- top_lr ------------------------------------------------------------------------------------------------


def bench_top_lr(args) -> None:
    for seed in args.seeds:  # build (or read) the features once, before the workers start
        block_features(seed, args.cache_dir)
    jobs = [{"seed": seed, "mode": "block", "name": f"selmix top_lr={v:g}", "top_lr": v,
             "overrides": {"top_lr": v}, "cache_dir": args.cache_dir} for v in args.values for seed in args.seeds]
    jobs += [{"seed": seed, "mode": "head", "name": "selmix head only", "top_lr": 0.0, "overrides": {},
              "cache_dir": args.cache_dir} for seed in args.seeds]
    results = run_jobs(jobs, args.workers)
    print(f"\n### top_lr on mnist rho=100, seeds {args.seeds[0]}-{args.seeds[-1]} ({len(args.seeds)} seeds), "
          "SelMix defaults otherwise, test at the best validation report\n")
    print("| top_lr | row | val objective | test min recall | test mean recall |\n|---|---|---|---|---|")
    for v in [0.0] + list(args.values):
        for kind, row in (("none", "selmix"), ("posthoc", "selmix + class_weights")):
            mine = [r[kind] for r in results if r["top_lr"] == v]
            print(f"| {'head only' if v == 0 else f'{v:g}'} | {row} | {summary([r['val'] for r in mine])} | "
                  f"{summary([r['min_recall'] for r in mine])} | {summary([r['mean_recall'] for r in mine])} |")


# -- quality -----------------------------------------------------------------------------------------------


QUALITY_ROWS = {  # name -> config overrides (steps=0 is the starting head); each gives two rows (posthoc)
    "starting head": {"steps": 0, "eval_every": 50},
    "erm": {"method": "erm"},
    "uniform_mixup": {"method": "uniform_mixup"},
    "selmix": {},
}


def bench_quality(args) -> None:
    for seed in args.seeds:
        block_features(seed, args.cache_dir)
    jobs = []
    for seed in args.seeds:
        for name, overrides in QUALITY_ROWS.items():
            modes = ("head",) if overrides.get("steps") == 0 else ("head", "block")
            jobs += [{"seed": seed, "mode": mode, "name": name, "overrides": overrides, "cache_dir": args.cache_dir}
                     for mode in modes]
    jobs.sort(key=lambda job: job["mode"] == "head")  # long block trials first
    results = run_jobs(jobs, args.workers)
    print(f"\n### mnist rho=100, default CNN cut before its last block, seeds {args.seeds[0]}-{args.seeds[-1]} "
          f"({len(args.seeds)} seeds), default config (top_lr={FinetuneConfig().top_lr:g}), test metrics at the "
          "best validation report\n")
    print("| method | head only: test min recall | head only: test mean recall | top block: test min recall | "
          "top block: test mean recall | block - head (min recall) |")
    print("|---|---|---|---|---|---|")
    for kind in ("none", "posthoc"):
        for name in QUALITY_ROWS:
            by_mode = {mode: [r[kind] for r in sorted((r for r in results if r["name"] == name and r["mode"] == mode),
                                                      key=lambda r: r["seed"])] for mode in ("head", "block")}
            head, block = by_mode["head"], by_mode["block"]
            cells = [summary([r["min_recall"] for r in head]), summary([r["mean_recall"] for r in head])]
            if block:
                diff = np.mean([b["min_recall"] - h["min_recall"] for b, h in zip(block, head)])
                cells += [summary([r["min_recall"] for r in block]), summary([r["mean_recall"] for r in block]),
                          f"{diff:+.3f}"]
            else:
                cells += ["(no training)", "", ""]
            label = name if kind == "none" else ("class_weights alone" if name == "starting head"
                                                 else f"{name} + class_weights")
            print(f"| {label} | " + " | ".join(cells) + " |")
    seconds = [r["seconds"] for r in results if r["mode"] == "block"]
    if seconds:
        print(f"\nblock-mode trial: {np.mean(seconds):.0f} s on average (1 thread, {args.workers} at once)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["speed", "top_lr", "quality"])
    parser.add_argument("--seeds", type=parse_seeds, default=list(range(10)), help="e.g. 0-9 or 100-104")
    parser.add_argument("--seed", type=int, default=0, help="feature seed of the speed benchmark")
    parser.add_argument("--steps", type=int, default=500, help="steps of the speed benchmark's trials")
    parser.add_argument("--values", type=parse_floats, default=[1.0, 10.0, 100.0],
                        help="top_lr values of the top_lr benchmark")
    parser.add_argument("--workers", type=int, default=2, help="trials at once (one thread each)")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    {"speed": bench_speed, "top_lr": bench_top_lr, "quality": bench_quality}[args.which](args)


if __name__ == "__main__":
    main()
