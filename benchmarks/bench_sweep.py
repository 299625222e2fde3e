"""Sweep orchestration costs (issue 5, item 6).

    python benchmarks/bench_sweep.py overhead [--trials 8 --steps 25000 --checkpoint-every 1,auto]  # (a)
    python benchmarks/bench_sweep.py memory [--mb 512]                    # (b) 1, 2, 4 concurrent trials
    python benchmarks/bench_sweep.py driver [--trials 200]                # (c) driver RSS after 50 and N trials

(a) wall time of N trials through search() (Ray Tune + Optuna, worker start-up included, ray.init and
    the driver's baselines excluded) against the same N finetune calls in plain spawned Python processes,
    at concurrency 1 and 2. Digits features (backbone "identity"); --steps sets a trial's length (25000:
    ~10 s on an idle core). --checkpoint-every lists the search(checkpoint_every=...) settings to time in
    the same invocation ("auto": the default); per concurrency the order is the first setting, the plain
    processes, then the other settings, so that a drift of the machine's load shows.
(b) peak memory with 1, 2 and 4 concurrent trials (0.5 CPU each) on synthetic features of --mb MB:
    one object-store copy plus, per trial worker, its anonymous memory (RssAnon) above that of a process
    that has only imported torch and selmix_ray.engine. A Ray Tune worker holds ~150 MiB more than that
    whatever the features (Ray's core worker, ray.tune with pandas and pyarrow): a first sweep on 1 MiB
    features measures it, and the lines also give each worker's increase above that reference, which is
    what the features themselves cost.
(c) driver RSS (VmRSS) after 50 and after --trials tiny trials of one sweep; the experiment is kept for (d).
(d) `python benchmarks/bench_sweep.py compare PATH`: wall time of `run_search.py compare PATH` (own
    objective, and re-ranked by gmean from the stored confusion counts) in a fresh process, Ray stopped.
Every number is printed as one line; the machine's load is printed first (other jobs skew timings).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


def _kib(field: str, pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _init_ray(num_cpus: int = 2) -> None:
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             object_store_memory=3_000_000_000)


def _digits():
    from selmix_ray.features import build_features

    return build_features("digits", rho=10, backbone="identity")


# -- (a) overhead --------------------------------------------------------------------------------------


def _plain_trial(args) -> float:
    config_dict, build_args = args
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from selmix_ray.engine import FinetuneConfig, finetune
    from selmix_ray.features import rebuild_features

    features = rebuild_features(build_args)
    finetune(features, FinetuneConfig.from_dict(config_dict))
    return 0.0


def overhead(trials: int, steps: int, checkpoint_every: list[int | None]) -> None:
    sweep = importlib.import_module("selmix_ray.sweep")
    from selmix_ray.baselines import compute_baselines
    from selmix_ray.space import load_space

    features = _digits()
    space_dict = {"objective": "min_recall",
                  "space": {"lr": {"loguniform": [0.3, 3.0]}, "refresh_every": {"int": [5, 20]}},
                  "fixed": {"steps": steps, "eval_every": steps // 10}}
    space = load_space(space_dict)
    compute_baselines(features, space, repeats=1, seed=0)  # cached: not part of the timing
    _init_ray()
    storage = tempfile.mkdtemp(prefix="bench_sweep_")
    for concurrency in (1, 2):
        tune_s: dict[str, float] = {}
        configs = None
        for every in checkpoint_every:
            label = "auto" if every is None else str(every)
            started = time.perf_counter()
            run = sweep.search(space_dict, features=features, storage=storage,
                               name=f"overhead_c{concurrency}_every{label}", num_samples=trials,
                               max_concurrent=concurrency, scheduler="fifo", checkpoint_every=every,
                               resources_per_trial={"cpu": 2 / concurrency if concurrency > 1 else 1})
            tune_s[label] = time.perf_counter() - started
            checkpoints = len(list(Path(storage).glob(f"overhead_c{concurrency}_every{label}/*/checkpoint_*")))
            print(f"(a) concurrency={concurrency} checkpoint_every={label} ({run.manifest['checkpoint_every']}):"
                  f" tune+optuna {tune_s[label]:.1f} s, {checkpoints} checkpoints kept", flush=True)
            if configs is None:  # the same seed gives every setting the same configurations (checked below)
                configs = _configs(run, space)
                started = time.perf_counter()
                with ProcessPoolExecutor(max_workers=concurrency, mp_context=get_context("spawn")) as pool:
                    list(pool.map(_plain_trial, [(c, features.metadata["build_args"]) for c in configs]))
                plain_s = time.perf_counter() - started
                print(f"(a) concurrency={concurrency}: plain processes {plain_s:.1f} s", flush=True)
            elif sorted(map(repr, _configs(run, space))) != sorted(map(repr, configs)):
                print("(a) warning: this setting got other configurations than the first", flush=True)
        for label, seconds in tune_s.items():
            print(f"(a) concurrency={concurrency} trials={trials} steps={steps} checkpoint_every={label}: "
                  f"tune+optuna {seconds:.1f} s, plain processes {plain_s:.1f} s, overhead "
                  f"{100 * (seconds / plain_s - 1):+.1f}%", flush=True)


def _configs(run, space) -> list[dict]:
    configs = [space.trial_config({k[len("config/"):]: v for k, v in row.items() if k.startswith("config/")})
               for row in run.df.to_dict("records")]
    return [{**c, "seed": 0, "device": "cpu"} for c in configs]


# -- (b) memory ----------------------------------------------------------------------------------------


def _synthetic(mb: int):
    import numpy as np

    from selmix_ray.featureset import FeatureSet, Split

    K, d = 10, 512
    n_train = mb * 2**20 // (d * 4)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(K, d)).astype(np.float32)

    def split(n):
        y = (np.arange(n) % K).astype(np.int64)
        x = centers[y] + rng.standard_normal((n, d), dtype=np.float32)
        return Split(x=x, y=y)

    return FeatureSet(train=split(n_train), val=split(500), test=split(500), n_classes=K,
                      weight=np.zeros((K, d), np.float32), bias=np.zeros(K, np.float32), key=f"synthetic{mb}",
                      metadata={})


def _worker_pids() -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                title = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if title.startswith("ray::ImplicitFunc") or "run_trial" in title and title.startswith("ray::"):
                out.append(int(proc.name))
    return out


def _torch_baseline_kib() -> int:
    code = ("import torch, selmix_ray.engine, pathlib;"
            "print([l for l in pathlib.Path('/proc/self/status').read_text().splitlines()"
            " if l.startswith('RssAnon')][0].split()[1])")
    return int(subprocess.check_output([sys.executable, "-c", code]).decode().strip())


def memory(mb: int) -> None:
    sweep = importlib.import_module("selmix_ray.sweep")

    features = _synthetic(mb)
    tiny = _synthetic(1)
    space_dict = {"objective": "min_recall", "space": {"lr": {"loguniform": [0.3, 3.0]}},
                  "fixed": {"steps": 200, "eval_every": 20}}
    from selmix_ray.baselines import compute_baselines
    from selmix_ray.space import load_space

    for feature_set in (tiny, features):
        compute_baselines(feature_set, load_space(space_dict), repeats=1, seed=0)
    _init_ray(num_cpus=2)
    base = _torch_baseline_kib()
    storage = tempfile.mkdtemp(prefix="bench_sweep_mem_")
    reference = _worker_peaks(sweep, tiny, space_dict, storage, concurrency=1, name="mem_reference")[0]
    print(f"(b) features {features.nbytes / 2**20:.0f} MiB; a torch-only process holds {base / 1024:.0f} MiB "
          f"anonymous; a Ray Tune trial worker on 1 MiB features {reference / 1024:.0f} MiB", flush=True)
    for concurrency in (1, 2, 4):
        peaks = _worker_peaks(sweep, features, space_dict, storage, concurrency=concurrency,
                              name=f"mem_c{concurrency}")
        extra = [max(p - base, 0) / 1024 for p in peaks]
        over_reference = [(p - reference) / 1024 for p in peaks]
        total = features.nbytes / 2**20 + sum(extra)
        print(f"(b) concurrent={concurrency}: per-worker anon increase {[round(e) for e in extra]} MiB; "
              f"total {total:.0f} MiB = {total / (features.nbytes / 2**20):.2f}x the feature bytes; above a "
              f"worker on 1 MiB features: {[round(e) for e in over_reference]} MiB, total "
              f"{(features.nbytes / 2**20 + sum(max(e, 0) for e in over_reference)) / (features.nbytes / 2**20):.2f}x",
              flush=True)


def _worker_peaks(sweep, features, space_dict, storage, *, concurrency: int, name: str) -> list[int]:
    """Peak RssAnon (KiB) of the ``concurrency`` busiest trial workers during a ``concurrency``-trial sweep."""
    peaks: dict[int, int] = {}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            for pid in _worker_pids():
                try:
                    peaks[pid] = max(peaks.get(pid, 0), _kib("RssAnon", pid))
                except OSError:
                    pass
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    sweep.search(space_dict, features=features, storage=storage, name=name, num_samples=concurrency,
                 max_concurrent=concurrency, scheduler="fifo", resources_per_trial={"cpu": 0.5})
    stop.set()
    thread.join()
    return sorted(peaks.values())[-concurrency:]


# -- (c) driver RSS ------------------------------------------------------------------------------------


def driver(trials: int) -> None:
    sweep = importlib.import_module("selmix_ray.sweep")

    features = _digits()
    space_dict = {"objective": "min_recall", "space": {"lr": {"loguniform": [0.3, 3.0]}},
                  "fixed": {"steps": 10, "eval_every": 10}}
    _init_ray()
    storage = tempfile.mkdtemp(prefix="bench_sweep_driver_")
    experiment = Path(storage, "driver")
    samples: list[tuple[int, int]] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            started = len(list(experiment.glob("run_trial_*"))) if experiment.exists() else 0
            samples.append((started, _kib("VmRSS")))
            time.sleep(0.5)

    thread = threading.Thread(target=sample, daemon=True)
    before = _kib("VmRSS")
    thread.start()
    sweep.search(space_dict, features=features, storage=storage, name="driver", num_samples=trials,
                 max_concurrent=2, scheduler="fifo")
    stop.set()
    thread.join()
    at_50 = next((rss for started, rss in samples if started >= 50), samples[-1][1])
    end = _kib("VmRSS")
    print(f"(c) driver VmRSS: before {before / 1024:.0f} MiB, after 50 trials {at_50 / 1024:.0f} MiB, after "
          f"{trials} trials {end / 1024:.0f} MiB; growth {(end - at_50) / max(trials - 50, 1):.0f} KiB/trial "
          "between them", flush=True)
    print(json.dumps({"samples": samples[-5:]}))
    print(f"(c) experiment kept for (d): python benchmarks/bench_sweep.py compare {experiment}", flush=True)


def compare_timing(path: str, repeats: int = 3) -> None:
    """(d) wall time of `run_search.py compare PATH` (own objective, then re-ranked by gmean), Ray stopped."""
    import ray

    if ray.is_initialized():
        raise SystemExit("(d) needs Ray stopped")
    for extra in ([], ["--objective", "gmean"]):
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            done = subprocess.run([sys.executable, str(ROOT / "run_search.py"), "compare", path, *extra],
                                  capture_output=True, text=True)
            times.append(time.perf_counter() - started)
            if done.returncode != 0:
                raise SystemExit(done.stderr[-2000:])
        label = " ".join(extra) or "(own objective)"
        print(f"(d) compare {label} over {path}: best {min(times):.2f} s, median {statistics.median(times):.2f} s "
              f"of {repeats} (process start and imports included)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["overhead", "memory", "driver", "compare"])
    parser.add_argument("path", nargs="?", help="(d) experiment folder to time `run_search.py compare` on")
    parser.add_argument("--trials", type=int, default=None, help="trials (a: 8, c: 200)")
    parser.add_argument("--steps", type=int, default=25000, help="(a) steps per trial (a multiple of 10)")
    parser.add_argument("--checkpoint-every", default="1,auto",
                        help="(a) comma-separated checkpoint_every settings to compare; auto = the default")
    parser.add_argument("--mb", type=int, default=512, help="(b) synthetic feature megabytes")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()}, {os.cpu_count()} CPUs", flush=True)
    if args.what == "overhead":
        settings = [None if v.strip() == "auto" else int(v) for v in args.checkpoint_every.split(",")]
        overhead(args.trials or 8, args.steps, settings)
    elif args.what == "memory":
        memory(args.mb)
    elif args.what == "driver":
        driver(args.trials or 200)
    else:
        if not args.path:
            parser.error("compare needs PATH (an experiment, e.g. the one `driver` keeps)")
        compare_timing(args.path)


if __name__ == "__main__":
    main()
