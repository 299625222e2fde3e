"""Feature building and sharing: extraction throughput, cold vs cached load, memory of N Ray tasks.

    .venv/bin/python benchmarks/bench_features.py                 # everything (about 2-4 minutes)
    .venv/bin/python benchmarks/bench_features.py --skip-memory   # only the mnist build and cache

Targets (issue 3): cached load >= 50x faster than extraction (forward passes and writing, CNN training
excluded) for mnist with the CNN; N = 4 concurrent tasks hold the features once (total <= 1.2x the
feature bytes); the default mnist, rho = 100 build (training + extraction) in <= 60 s on 2 cores.

Memory is counted as one object-store copy plus each worker's increase in anonymous memory (RssAnon)
after it has imported torch, for features stored as numpy (wrapped with torch.from_numpy in the task)
and, side by side, as a torch tensor.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np


def rss_anon_bytes() -> int:
    """Anonymous resident memory of this process (Linux /proc/self/status RssAnon)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("RssAnon not found in /proc/self/status (Linux only).")


def bench_mnist(cache_dir: str, repeats: int) -> dict:
    from selmix_ray.features import build_features

    started = time.perf_counter()
    cold = build_features("mnist", rho=100, cache_dir=cache_dir, progress=False)
    total_cold = time.perf_counter() - started
    t = cold.metadata["timings"]
    extraction = t["extract_s"] + t["write_s"] + t.get("head_s", 0.0)
    hits = []
    for _ in range(repeats):
        started = time.perf_counter()
        hit = build_features("mnist", rho=100, cache_dir=cache_dir, progress=False)
        hits.append(time.perf_counter() - started)
        assert hit.metadata["cache_hit"]
    started = time.perf_counter()
    hit = build_features("mnist", rho=100, cache_dir=cache_dir, progress=False)
    touched = sum(float(np.asarray(getattr(hit, s).x, np.float64).sum()) for s in ("train", "val", "test"))
    hit_and_read = time.perf_counter() - started
    cached = statistics.median(hits)
    return {
        "train_counts": cold.train_counts.tolist(),
        "feature_dim": cold.dim,
        "images_extracted": cold.metadata["images_extracted"],
        "images_per_s": t["images_per_s"],
        "build_total_s": total_cold,
        "load_s": t["load_s"],
        "backbone_train_s": t["backbone_s"],
        "extraction_s": extraction,
        "cached_load_s": cached,
        "cached_load_and_read_s": hit_and_read,
        "ratio": extraction / cached,
        "ratio_read": extraction / hit_and_read,
        "checksum": touched,
    }


def bench_memory(feature_mb: int, counts: list[int]) -> list[dict]:
    import ray
    import torch

    rows_n = feature_mb * 1_000_000 // (4 * 1024)
    features = np.random.default_rng(0).standard_normal((rows_n, 1024), dtype=np.float32)
    feature_bytes = features.nbytes

    @ray.remote
    def hold(boxed_ref, as_torch_view: bool, seconds: float):
        import torch  # noqa: F401  (imported before the baseline, as trials do)

        before = rss_anon_bytes()
        payload = ray.get(boxed_ref[0])
        x = payload["x"]
        if as_torch_view:  # numpy from the store, wrapped without a copy as a trial would
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the view is read-only; torch warns about that
                x = torch.from_numpy(x)
        total = float(x.sum())  # touch every page
        time.sleep(seconds)  # stay alive while the other tasks hold theirs
        return {"increase": rss_anon_bytes() - before, "sum": total, "type": type(payload["x"]).__name__}

    results = []
    for kind in ("numpy", "torch"):
        obj = {"x": features if kind == "numpy" else torch.from_numpy(features)}
        ref = ray.put(obj)
        for n in counts:
            tasks = [hold.options(num_cpus=min(1.0, 2 / n)).remote([ref], kind == "numpy", 2.0) for _ in range(n)]
            out = ray.get(tasks)
            increases = [o["increase"] for o in out]
            total = feature_bytes + sum(increases)
            results.append({
                "kind": kind, "n": n, "feature_mb": feature_bytes / 1e6,
                "per_task_mb": [round(i / 1e6, 1) for i in increases],
                "total_mb": total / 1e6, "ratio": total / feature_bytes,
            })
        del ref, obj
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="cache hits to time (median reported)")
    parser.add_argument("--feature-mb", type=int, default=520, help="synthetic feature array size, MB")
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()

    print(f"load average at start: {os.getloadavg()}; cpus: {os.cpu_count()}")
    with tempfile.TemporaryDirectory(prefix="bench-features-") as cache_dir:
        r = bench_mnist(cache_dir, args.repeats)
    print("\n== mnist, rho = 100, default CNN backbone ==")
    print(f"labeled counts {r['train_counts']}, feature dim {r['feature_dim']}")
    print(f"build total (data + CNN training + extraction + write): {r['build_total_s']:.1f} s  (target <= 60 s)")
    print(f"  data load {r['load_s']:.2f} s, CNN training {r['backbone_train_s']:.1f} s, "
          f"extraction+write {r['extraction_s']:.2f} s")
    print(f"extraction throughput: {r['images_per_s']:.0f} images/s over {r['images_extracted']} images")
    print(f"cached load (median of {args.repeats}): {r['cached_load_s'] * 1e3:.2f} ms -> "
          f"{r['ratio']:.0f}x faster than extraction+write (target >= 50x)")
    print(f"cached load + reading every feature once: {r['cached_load_and_read_s'] * 1e3:.2f} ms -> {r['ratio_read']:.0f}x")

    if args.skip_memory:
        return
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=int(args.feature_mb * 1e6 * 1.6) + 300_000_000)
    try:
        rows = bench_memory(args.feature_mb, args.tasks)
    finally:
        ray.shutdown()
    print("\n== N concurrent Ray tasks holding one synthetic feature array ==")
    print("total = one object-store copy + each task's RssAnon increase after importing torch")
    print(f"{'stored as':<10}{'N':>3}{'feature MB':>12}{'per-task increase MB':>32}{'total MB':>10}{'x features':>12}")
    for row in rows:
        print(f"{row['kind']:<10}{row['n']:>3}{row['feature_mb']:>12.0f}{str(row['per_task_mb']):>32}"
              f"{row['total_mb']:>10.0f}{row['ratio']:>12.2f}")
    numpy_n4 = [row for row in rows if row["kind"] == "numpy" and row["n"] == max(args.tasks)]
    if numpy_n4:
        print(f"numpy, N = {max(args.tasks)}: {numpy_n4[0]['ratio']:.2f}x the feature bytes (target <= 1.2x)")


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    main()
