"""ImageNet-LT scale on one machine (issue 12): the npz build, the cached load and one trial at K = 1000.

    .venv/bin/python benchmarks/bench_scale.py --threads 1          # the ImageNet-LT shape (10-20 minutes)
    .venv/bin/python benchmarks/bench_scale.py --classes 200 --n-max 320   # a smaller shape (under a minute)
    .venv/bin/python benchmarks/bench_scale.py --folder /data/bench --keep  # keep the npz and the cache

The data are generated, nothing is downloaded: seeded Gaussian class clusters (class means drawn from
N(0, scale^2 I), samples mean + N(0, noise^2 I)) with the ImageNet-LT shape by default: K = 1000 classes,
d = 512, a long-tailed train split of 1280 down to 5 per class (rho = 256, about 230k rows), 20 validation
and 50 test rows per class (585 MiB of float32 features). Everything is written under a temporary folder
(or ``--folder``) and removed at the end unless ``--keep``.

It prints:
- the build through the npz path with ``backbone="identity"`` (the features are the data, so the ERM head
  is fitted): total time and its parts (read, validate, ERM head fit, cache write), in a child process so
  that its peak memory (ru_maxrss) is its own; target: <= 2 minutes on 2 cores, dominated by I/O; and, in
  the same child, a few steps of the former full-batch fit timed on the same rows (the ratio holds on a
  shared machine where the absolute times do not); ``--head-epochs 1`` (``--head-steps 0``) also builds
  with other ``head_epochs`` (``head_steps``; 0: one pass) and prints each head's validation cross-entropy
  and recalls beside the default's;
- the cached load in a fresh process (a cache hit: memory-mapped, nothing read) and in this one;
- one trial of head-only SelMix (``--steps 200 --eval-every 100 --posthoc class_weights`` by default) at
  K = 100 and at K = 1000, each in a child process: wall time and time per part (gain refresh, pair
  sampling, training steps, evaluation, post-hoc fit, checkpoints: ``bench_trial.run_trial``), the last
  checkpoint's state file and history sizes, the trial folder with the kept checkpoints, and the child's
  peak memory;
- the same K = 1000 trial on float16 storage (built with ``dtype="float16"``, reusing the float32 build's
  head through ``head=`` so that the head is not fitted twice): peak memory of the build and the trial;
- 4 trials at K = 1000 through ``search()`` (Ray Tune + Optuna, 2 at a time, 1 CPU each, FIFO; the
  driver's baselines timed apart, before) against the same 4 configurations as plain processes (2 at a
  time, one torch thread each), and the experiment folder's size.

The machine may be shared: every time is wall-clock and the load average is printed at the start.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULT = "BENCH_RESULT "  # prefix of the JSON line a child prints


# -- data ------------------------------------------------------------------------------------------


def generate(path: Path, *, classes: int, dim: int, n_max: int, rho: float, n_val: int, n_test: int,
             scale: float, noise: float, seed: int) -> dict:
    """Write the seeded Gaussian-cluster npz (uncompressed); returns its facts."""
    from selmix_ray.data import long_tail_counts

    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((classes, dim), dtype=np.float32) * scale  # (K, d)
    counts = {"train": long_tail_counts(n_max, rho, classes), "val": np.full(classes, n_val),
              "test": np.full(classes, n_test)}
    arrays = {}
    for split, per_class in counts.items():
        y = np.repeat(np.arange(classes), per_class)  # (n,)
        x = rng.standard_normal((len(y), dim), dtype=np.float32)  # (n, d)
        for start in range(0, len(y), 1 << 16):  # in place, by chunks: no (n, d) temporary
            x[start:start + (1 << 16)] *= noise
            x[start:start + (1 << 16)] += means[y[start:start + (1 << 16)]]
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y
    generated = time.perf_counter() - started
    started = time.perf_counter()
    np.savez(path, **arrays)
    return {"rows": {s: len(arrays[f"y_{s}"]) for s in counts}, "train_max": int(counts["train"].max()),
            "train_min": int(counts["train"].min()), "bytes": path.stat().st_size, "generate_s": generated,
            "write_s": time.perf_counter() - started}


# -- children ----------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def child_build(task: dict) -> dict:
    from selmix_ray.features import build_features

    started = time.perf_counter()
    fs = build_features("npz", rho=None, backbone="identity", root=task["npz"], cache_dir=task["cache"],
                        dtype=task["dtype"], progress=task.get("progress", False), **task.get("opts", {}))
    total = time.perf_counter() - started
    from selmix_ray.head import matmul_dtype

    products = matmul_dtype("cpu", full=len(fs.train) <= fs.metadata["build_args"]["opts"].get("head_batch_size", 1024),
                            n_weights=fs.n_classes * fs.dim)
    out = {"total_s": total, "timings": fs.metadata["timings"], "cache_hit": fs.metadata["cache_hit"],
           "head_products": str(products).replace("torch.", ""),
           "head_source": fs.metadata["head_source"], "peak_rss_mb": peak_rss_mb(), "cache_path": fs.metadata["cache_path"]}
    if task.get("save_head"):
        np.savez(task["save_head"], weight=fs.weight, bias=fs.bias)
    if task.get("quality"):
        out["quality"] = head_quality(fs)
    if task.get("old_steps"):
        out["old_step_s"] = time_former_fit(fs, task["old_steps"])
    return out


def time_former_fit(fs, steps: int) -> float:
    """Seconds per step of the former ERM fit (full-batch Adam, 300 steps by default) on the same rows."""
    import warnings

    import torch

    from selmix_ray.device import torch_threads

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cached array is read-only; torch warns about that
        x = torch.from_numpy(fs.train.x)
    y = torch.from_numpy(np.asarray(fs.train.y))
    threads = 1 if x.shape[0] * x.shape[1] < 2_000_000 else None  # as the former fit chose
    with torch_threads(threads):
        linear = torch.nn.Linear(x.shape[1], fs.n_classes)
        optimizer = torch.optim.Adam(linear.parameters(), lr=0.01, weight_decay=1e-4)
        started = time.perf_counter()
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(linear(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return (time.perf_counter() - started) / steps


def head_quality(fs) -> dict:
    """Validation cross-entropy, mean and min recall, and test mean recall of the starting head (numpy)."""
    out = {}
    for name in ("val", "test"):
        split = getattr(fs, name)
        logits = np.asarray(split.x, np.float32) @ fs.weight.T + fs.bias  # (n, K)
        logits -= logits.max(axis=1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        pred = logits.argmax(axis=1)
        recall = np.bincount(split.y[pred == split.y], minlength=fs.n_classes) / np.bincount(split.y, minlength=fs.n_classes)
        out[name] = {"cross_entropy": float(-log_p[np.arange(len(split.y)), split.y].mean()),
                     "mean_recall": float(recall.mean()), "min_recall": float(recall.min())}
    return out


def child_cached(task: dict) -> dict:
    started = time.perf_counter()
    from selmix_ray.features import build_features

    imported = time.perf_counter() - started
    started = time.perf_counter()
    fs = build_features("npz", rho=None, backbone="identity", root=task["npz"], cache_dir=task["cache"],
                        dtype=task["dtype"], progress=False, **task.get("opts", {}))
    hit = time.perf_counter() - started
    from selmix_ray.data import root_identity

    started = time.perf_counter()
    root_identity("npz", task["npz"])  # the checksum of the npz, part of every call's cache key
    return {"hit_s": hit, "import_s": imported, "cache_hit": fs.metadata["cache_hit"],
            "hash_s": time.perf_counter() - started}


def child_trial(task: dict) -> dict:
    """One trial timed by part (bench_trial.run_trial), on the cached features; the child's peak memory."""
    from types import SimpleNamespace

    import torch
    from bench_trial import run_trial  # benchmarks/ is on sys.path when run as a script

    from selmix_ray.features import build_features

    if task.get("threads"):
        torch.set_num_threads(task["threads"])
    fs = build_features("npz", rho=None, backbone="identity", root=task["npz"], cache_dir=task["cache"],
                        dtype=task["dtype"], progress=False, **task.get("opts", {}))
    assert fs.metadata["cache_hit"], "the trial child expects the features to be cached already"
    rss_features = peak_rss_mb()
    args = SimpleNamespace(steps=task["steps"], eval_every=task["eval_every"], posthoc=task["posthoc"])
    with tempfile.TemporaryDirectory() as folder:
        result = run_trial(fs, args, Path(folder) / "trial")
    return {**result, "peak_rss_mb": peak_rss_mb(), "rss_after_load_mb": rss_features}


def sweep_vs_plain(npz: str, cache: str, *, steps: int, eval_every: int, storage: Path) -> dict:
    """A 4-trial search() (2 at a time, 1 CPU each, FIFO) against the same 4 configs as plain processes.

    The driver's baselines are computed first and timed apart (search() reuses them from the cache).
    """
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from bench_sweep import _configs, _init_ray, _plain_trial

    from selmix_ray.baselines import compute_baselines
    from selmix_ray.features import build_features
    from selmix_ray.space import load_space
    from selmix_ray.sweep import search

    fs = build_features("npz", rho=None, backbone="identity", root=npz, cache_dir=cache, progress=False)
    space_dict = {"objective": "min_recall",
                  "space": {"lr": {"loguniform": [0.3, 3.0]}, "s": {"uniform": [1.0, 10.0]}},
                  "fixed": {"steps": steps, "eval_every": eval_every}}
    started = time.perf_counter()
    compute_baselines(fs, load_space(space_dict), repeats=1, seed=0)
    baselines_s = time.perf_counter() - started
    _init_ray()
    started = time.perf_counter()
    run = search(space_dict, features=fs, storage=str(storage), name="scale", num_samples=4, max_concurrent=2,
                 scheduler="fifo", resources_per_trial={"cpu": 1})
    tune_s = time.perf_counter() - started
    configs = _configs(run, load_space(space_dict))
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn")) as pool:
        list(pool.map(_plain_trial, [(c, fs.metadata["build_args"]) for c in configs]))
    plain_s = time.perf_counter() - started
    import ray

    ray.shutdown()
    folder = storage / "scale"
    files = [p for p in folder.rglob("*") if p.is_file()]
    return {"baselines_s": baselines_s, "tune_s": tune_s, "plain_s": plain_s,
            "folder_bytes": sum(p.stat().st_size for p in files),
            "checkpoint_bytes": sum(p.stat().st_size for p in files if "checkpoint_" in str(p.parent)),
            "baselines_bytes": (folder / "baselines.json").stat().st_size}


def run_child(kind: str, task: dict, *, timeout: float) -> dict:
    command = [sys.executable, __file__, "--child", kind, json.dumps(task)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"child {kind} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT):])


# -- the report ----------------------------------------------------------------------------------------


def print_build(label: str, r: dict) -> None:
    t = r["timings"]
    parts = [f"read {t.get('read_s', 0):.1f} s", f"validate {t.get('validate_s', 0):.1f} s",
             f"split+convert {t.get('load_s', 0) - t.get('read_s', 0) - t.get('validate_s', 0) + t.get('extract_s', 0):.1f} s",
             f"finite check {t.get('check_s', 0):.1f} s", f"ERM head {t.get('head_s', 0):.1f} s",
             f"cache write {t.get('write_s', 0):.1f} s"]
    products = f" ({r['head_products']} products on the CPU)" if r["head_source"] == "erm" else ""
    print(f"{label}: {r['total_s']:.1f} s ({', '.join(parts)}); head {r['head_source']}{products}; "
          f"peak memory {r['peak_rss_mb']:.0f} MB")


def print_trial(label: str, r: dict) -> None:
    from bench_trial import print_trial as print_parts

    print_parts(label, r)
    print(f"  peak memory {r['peak_rss_mb']:.0f} MB ({r['rss_after_load_mb']:.0f} MB after loading the features)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=1000, help="K (default 1000)")
    parser.add_argument("--dim", type=int, default=512, help="feature dimension d (default 512)")
    parser.add_argument("--n-max", type=int, default=1280, help="train rows of class 0 (default 1280)")
    parser.add_argument("--n-min", type=int, default=5, help="train rows of the rarest class (default 5)")
    parser.add_argument("--n-val", type=int, default=20, help="validation rows per class (default 20)")
    parser.add_argument("--n-test", type=int, default=50, help="test rows per class (default 50)")
    parser.add_argument("--scale", type=float, default=0.2, help="std of the class means (default 0.2)")
    parser.add_argument("--noise", type=float, default=1.0, help="std of the samples around their mean (default 1: "
                                                                 "feature norms about sqrt(d), as a ResNet's)")
    parser.add_argument("--old-steps", type=int, default=2, help="steps of the former full-batch fit to time for "
                                                                 "the ratio (default 2; 0 skips)")
    parser.add_argument("--head-epochs", type=float, nargs="*", default=[],
                        help="also build with these head_epochs (other caches) and compare the head's quality")
    parser.add_argument("--head-steps", type=int, nargs="*", default=[],
                        help="also build with these head_steps (0: one pass at scale) and compare the head's quality")
    parser.add_argument("--small-classes", type=int, default=100, help="K of the second trial (default 100)")
    parser.add_argument("--steps", type=int, default=200, help="trial steps (default 200)")
    parser.add_argument("--eval-every", type=int, default=100, help="trial eval_every (default 100)")
    parser.add_argument("--posthoc", default="class_weights", help="the trials' posthoc (default class_weights)")
    parser.add_argument("--sweep-steps", type=int, default=100, help="steps of the 4 sweep trials (default 100; "
                                                                     "eval_every a half of it)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the trial children")
    parser.add_argument("--folder", help="where the npz files and the cache go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the folder")
    parser.add_argument("--skip-float16", action="store_true", help="skip the float16 build and trial")
    parser.add_argument("--skip-trials", action="store_true", help="only the build and the cached load")
    parser.add_argument("--skip-sweep", action="store_true", help="skip the 4-trial sweep against plain processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "TASK"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        kind, task = args.child
        result = {"build": child_build, "cached": child_cached, "trial": child_trial}[kind](json.loads(task))
        print(RESULT + json.dumps(result), flush=True)
        return

    folder = Path(args.folder or tempfile.mkdtemp(prefix="bench-scale-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"load average at start: {os.getloadavg()}; cpus: {os.cpu_count()}; folder {folder}")
    try:
        report(args, folder)
    finally:
        print(f"\nload average at the end: {os.getloadavg()}")
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


def report(args, folder: Path) -> None:
    timeout = 1800
    rho = args.n_max / args.n_min
    shape = dict(dim=args.dim, n_max=args.n_max, rho=rho, n_val=args.n_val, n_test=args.n_test,
                 scale=args.scale, noise=args.noise, seed=args.seed)
    big = folder / f"k{args.classes}.npz"
    facts = generate(big, classes=args.classes, **shape)
    print(f"\n== data: K={args.classes}, d={args.dim}, train {facts['train_max']} -> {facts['train_min']} per class, "
          f"rows {facts['rows']}, {facts['bytes'] / 2**20:.0f} MiB (generated in {facts['generate_s']:.1f} s, "
          f"written in {facts['write_s']:.1f} s)")
    cache = str(folder / "cache")
    head_file = str(folder / "head32.npz")
    build = run_child("build", {"npz": str(big), "cache": cache, "dtype": "float32", "save_head": head_file,
                                "quality": True, "old_steps": args.old_steps}, timeout=timeout)
    print("\n== build (npz path, backbone='identity', float32; target <= 120 s on 2 cores) ==")
    print_build("cold build", build)
    if "old_step_s" in build:
        old = 300 * build["old_step_s"]
        print(f"former full-batch fit, timed here on the same rows: {build['old_step_s']:.1f} s per step x 300 steps "
              f"= {old:.0f} s; the minibatch fit took {build['timings']['head_s']:.1f} s "
              f"(ratio {old / build['timings']['head_s']:.1f})")
    print_quality("starting head (default head_epochs)", build["quality"])
    others = [("head_epochs", e) for e in args.head_epochs] + [("head_steps", n) for n in args.head_steps]
    for option, value in others:
        other = run_child("build", {"npz": str(big), "cache": str(folder / f"cache_{option}{value}"), "dtype": "float32",
                                    "quality": True, "opts": {option: value}}, timeout=timeout)
        print_build(f"cold build, {option} {value}", other)
        print_quality(f"starting head ({option} {value})", other["quality"])
    cached = run_child("cached", {"npz": str(big), "cache": cache, "dtype": "float32"}, timeout=timeout)
    from selmix_ray.features import build_features

    started = time.perf_counter()
    hit = build_features("npz", rho=None, backbone="identity", root=str(big), cache_dir=cache, progress=False)
    in_process = time.perf_counter() - started
    assert cached["cache_hit"] and hit.metadata["cache_hit"]
    print(f"cached load: {cached['hit_s'] * 1e3:.0f} ms in a fresh process (after {cached['import_s']:.1f} s of "
          f"imports), {in_process * 1e3:.0f} ms in this one; of which hashing the npz for the key "
          f"(xxh3-128) {cached['hash_s'] * 1e3:.0f} ms")

    if not args.skip_float16:
        build16 = run_child("build", {"npz": str(big), "cache": cache, "dtype": "float16",
                                      "opts": {"head": head_file}}, timeout=timeout)
        print_build("float16 build (head from the float32 build: no fit)", build16)

    if args.skip_trials:
        return
    small = folder / f"k{args.small_classes}.npz"
    generate(small, classes=args.small_classes, **shape)
    run_child("build", {"npz": str(small), "cache": cache, "dtype": "float32"}, timeout=timeout)
    trial = {"cache": cache, "steps": args.steps, "eval_every": args.eval_every, "posthoc": args.posthoc,
             "threads": args.threads}
    print(f"\n== one trial: head-only SelMix, steps={args.steps}, eval_every={args.eval_every}, "
          f"posthoc={args.posthoc}, CPU, torch threads {args.threads or 'default'} ==")
    small_trial = run_child("trial", {**trial, "npz": str(small), "dtype": "float32"}, timeout=timeout)
    print_trial(f"K={args.small_classes}, float32", small_trial)
    big_trial = run_child("trial", {**trial, "npz": str(big), "dtype": "float32"}, timeout=timeout)
    print_trial(f"K={args.classes}, float32", big_trial)
    if not args.skip_float16:
        half_trial = run_child("trial", {**trial, "npz": str(big), "dtype": "float16", "opts": {"head": head_file}},
                               timeout=timeout)
        print_trial(f"K={args.classes}, float16", half_trial)
        print(f"\npeak memory, float32 vs float16 storage: build {build['peak_rss_mb']:.0f} vs "
              f"{build16['peak_rss_mb']:.0f} MB, trial {big_trial['peak_rss_mb']:.0f} vs "
              f"{half_trial['peak_rss_mb']:.0f} MB")
    if args.skip_sweep:
        return
    steps = args.sweep_steps
    print(f"\n== 4 trials at K={args.classes} (steps={steps}, eval_every={steps // 2}), 2 at a time, 1 CPU each ==")
    r = sweep_vs_plain(str(big), cache, steps=steps, eval_every=steps // 2, storage=folder / "experiments")
    print(f"search() (Ray Tune + Optuna) {r['tune_s']:.1f} s vs the same 4 trials as plain processes "
          f"{r['plain_s']:.1f} s: overhead {100 * (r['tune_s'] / r['plain_s'] - 1):+.1f}%; the driver's baselines "
          f"before it {r['baselines_s']:.1f} s")
    print(f"experiment folder {r['folder_bytes'] / 1e6:.1f} MB (checkpoints {r['checkpoint_bytes'] / 1e6:.1f} MB, "
          f"baselines.json {r['baselines_bytes'] / 1e6:.2f} MB)")


def print_quality(label: str, q: dict) -> None:
    print(f"{label}: val cross-entropy {q['val']['cross_entropy']:.3f}, val mean/min recall "
          f"{q['val']['mean_recall']:.3f}/{q['val']['min_recall']:.3f}, test mean recall {q['test']['mean_recall']:.3f}")


if __name__ == "__main__":
    main()
