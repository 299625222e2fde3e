"""GPU check of the engine without Ray (issue 4 item 7): several engine processes sharing one GPU.

    python benchmarks/gpu_check.py                  # 4 processes, K = 100 trials; gain/refresh at K = 1000
    python benchmarks/gpu_check.py --device cpu     # the same code path on the CPU (a dry run)

Needs torch, numpy and scipy only (the CUDA machines have no Ray). Prints, in markdown:
- the gain matrix and one refresh (validation pass + gain + P) at K = 1000, d = 512, 10 val per class;
- steps/s of each of ``--processes`` concurrent ``Trainer`` processes on synthetic features, and each
  process's peak GPU memory (torch.cuda.max_memory_allocated).
Exits with status 0 and a message when there is no CUDA device.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time

import numpy as np
import torch

from selmix_ray.engine import FinetuneConfig, Trainer
from selmix_ray.featureset import FeatureSet, Split
from selmix_ray.gain import gain_matrix


def synthetic(K: int, d: int, *, n_train: int, n_val: int, seed: int = 0) -> FeatureSet:
    """Gaussian classes (float32), balanced; the head starts at 0.1 x the class means."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, 1.0, (K, d)).astype(np.float32)

    def split(n):
        y = np.repeat(np.arange(K), n)
        return Split((means[y] + rng.normal(0.0, 2.0, (len(y), d))).astype(np.float32), y)

    return FeatureSet(train=split(n_train), val=split(n_val), test=split(n_val), n_classes=K,
                      weight=0.1 * means, bias=np.zeros(K, np.float32))


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_gain_and_refresh(args) -> dict:
    """Median seconds of gain_matrix alone and of a whole refresh, K = args.gain_classes."""
    features = synthetic(args.gain_classes, args.dim, n_train=2, n_val=10)
    trainer = Trainer(features, FinetuneConfig(steps=50, eval_every=50, device=args.device))
    trainer.run_until(0)
    weight, bias = trainer.weight.double().cpu().numpy(), trainer.bias.double().cpu().numpy()
    counts = trainer.history.confusion(0, "val")
    gains, refreshes = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        gain_matrix(counts, trainer.centroids, weight, bias, trainer.objective)
        gains.append(time.perf_counter() - start)
        synchronize(args.device)
        start = time.perf_counter()
        trainer.refresh()  # the validation pass included
        synchronize(args.device)
        refreshes.append(time.perf_counter() - start)
    return {"gain_s": statistics.median(gains), "refresh_s": statistics.median(refreshes)}


def worker(rank: int, args, start_barrier, results) -> None:
    """One engine process: build synthetic features, wait for the others, time ``args.steps`` steps."""
    torch.set_num_threads(args.threads)
    features = synthetic(args.classes, args.dim, n_train=args.train_per_class, n_val=10)
    config = FinetuneConfig(steps=args.steps, eval_every=args.steps, device=args.device, seed=rank)
    trainer = Trainer(features, config)
    trainer.run_until(0)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start_barrier.wait()
    synchronize(args.device)
    start = time.perf_counter()
    report = trainer.run_until(args.steps)
    synchronize(args.device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else float("nan")
    results.put({"rank": rank, "steps_per_s": args.steps / elapsed, "peak_mib": peak,
                 "val_min_recall": report["val/min_recall"]})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--classes", type=int, default=100, help="K of the concurrent trials")
    parser.add_argument("--gain-classes", type=int, default=1000, help="K of the gain/refresh timing")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--train-per-class", type=int, default=50)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("No CUDA device is available: the GPU check was skipped (run with --device cpu for a dry run).")
        return 0
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"## GPU check on {name}, torch {torch.__version__}\n")

    timing = time_gain_and_refresh(args)
    print(f"K = {args.gain_classes}, d = {args.dim}, 10 val per class: gain {1e3 * timing['gain_s']:.0f} ms, "
          f"refresh {1e3 * timing['refresh_s']:.0f} ms (ratio {timing['refresh_s'] / timing['gain_s']:.2f})\n")

    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    barrier, results = context.Barrier(args.processes), context.Queue()
    processes = [context.Process(target=worker, args=(rank, args, barrier, results))
                 for rank in range(args.processes)]
    for process in processes:
        process.start()
    rows = [results.get(timeout=3600) for _ in processes]
    for process in processes:
        process.join()
    failed = [p.exitcode for p in processes if p.exitcode]
    print(f"{args.processes} processes sharing one device, K = {args.classes}, d = {args.dim}, "
          f"{args.steps} SelMix steps each (refresh every 10):\n")
    print("| process | steps/s | peak GPU memory (MiB) | val min recall |\n|---|---|---|---|")
    for row in sorted(rows, key=lambda r: r["rank"]):
        print(f"| {row['rank']} | {row['steps_per_s']:.0f} | {row['peak_mib']:.1f} | {row['val_min_recall']:.3f} |")
    print(f"\ntotal: {sum(r['steps_per_s'] for r in rows):.0f} steps/s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
