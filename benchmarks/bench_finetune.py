"""Benchmarks of the fine-tuning engine (issue 4 item 9); prints markdown.

    python benchmarks/bench_finetune.py speed          # (a) steps/s, cached features vs CNN in the loop
    python benchmarks/bench_finetune.py refresh        # (b) one refresh vs the gain alone, K = 10, 100, 1000
    python benchmarks/bench_finetune.py quality --seeds 0-9   # (c) mnist rho=100 quality table

(a) and (c) build (and cache) mnist features with the default CNN backbone; ``--cache-dir`` picks the
cache (default: the library's). Every run uses one torch thread (what a 1-CPU Ray trial gets).
The quality table's defaults were never tuned on seeds 0-9; pass ``--seeds 100-104`` to explore.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

# One thread for BLAS and torch, as Ray gives a 1-CPU trial (OMP_NUM_THREADS=1); set before numpy loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import parse_seeds  # noqa: E402

from selmix_ray.engine import FinetuneConfig, Trainer, finetune  # noqa: E402
from selmix_ray.featureset import FeatureSet, Split  # noqa: E402
from selmix_ray.gain import gain_matrix  # noqa: E402


def mnist_features(seed: int, cache_dir):
    from selmix_ray.features import build_features

    return build_features("mnist", rho=100, backbone="cnn", seed=seed, cache_dir=cache_dir, progress=False)


# -- (a) steps/s ---------------------------------------------------------------------------------------


def backbone_in_the_loop(features, config, *, cnn, images) -> Trainer:
    """A Trainer whose model's SGD step also runs the frozen CNN's forward pass on the 2 B images a step
    mixes (the same SGD steps otherwise; the images are drawn from their own generator)."""
    trainer = Trainer(features, config)
    step, rng = trainer.model.step, np.random.default_rng(0)

    def step_with_cnn(batch, at):
        index = torch.from_numpy(rng.integers(0, len(images), size=2 * config.batch_size))
        with torch.no_grad():
            cnn.maps(images[index]).mean(dim=(2, 3))
        step(batch, at)

    trainer.model.step = step_with_cnn
    return trainer


def bench_speed(args) -> None:
    from selmix_ray.backbones import SmallCNN
    from selmix_ray.data import load_dataset

    features = mnist_features(args.seed, args.cache_dir)
    raw = load_dataset("mnist")
    images = torch.from_numpy(raw.pools["train"].load(np.arange(2000)))  # (2000, 1, 28, 28)
    cnn = SmallCNN(images.shape[1], features.n_classes).eval()  # the default CNN's architecture (width 16)
    config = FinetuneConfig(steps=args.steps, eval_every=args.steps, device="cpu")

    def steps_per_second(trainer) -> float:
        trainer.run_until(0)  # the step-0 report and first refresh are not timed
        start = time.perf_counter()
        trainer.run_until(args.steps)
        return args.steps / (time.perf_counter() - start)

    cached = steps_per_second(Trainer(features, config))
    in_loop_steps = max(args.steps // 10, 1)
    config_loop = dataclasses.replace(config, steps=in_loop_steps, eval_every=in_loop_steps)
    args_steps, args.steps = args.steps, in_loop_steps
    in_loop = steps_per_second(backbone_in_the_loop(features, config_loop, cnn=cnn, images=images))
    args.steps = args_steps
    print(f"\n### (a) steps/s, mnist rho=100, default CNN (d={features.dim}), batch {config.batch_size}, 1 thread\n")
    print("| loop | steps/s |\n|---|---|")
    print(f"| cached features (SelMix, refresh every {config.refresh_every}, reports excluded) | {cached:.0f} |")
    print(f"| CNN forward on the 2B mixed images in the loop | {in_loop:.1f} |")
    print(f"\nratio: **{cached / in_loop:.0f}x** (target >= 50x)")


# -- (b) refresh cost ------------------------------------------------------------------------------------


def synthetic(K: int, d: int, *, n_val: int, n_train: int, seed: int = 0) -> FeatureSet:
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, 1.0, (K, d)).astype(np.float32)

    def split(n):
        y = np.repeat(np.arange(K), n)
        return Split((means[y] + rng.normal(0.0, 2.0, (len(y), d))).astype(np.float32), y)

    weight = (0.1 * means).astype(np.float32)
    return FeatureSet(train=split(n_train), val=split(n_val), test=split(1), n_classes=K, weight=weight,
                      bias=np.zeros(K, np.float32))


def bench_refresh(args) -> None:
    print("\n### (b) one refresh vs the gain alone (10 val per class, d = 512, 1 thread, median)\n")
    print("| K | gain_matrix (ms) | refresh (ms) | ratio |\n|---|---|---|---|")
    for K in (10, 100, 1000):
        features = synthetic(K, 512, n_val=10, n_train=2)
        trainer = Trainer(features, FinetuneConfig(steps=50, eval_every=50, device="cpu"))
        trainer.run_until(0)
        weight, bias = trainer.weight.double().numpy(), trainer.bias.double().numpy()
        counts = trainer.history.confusion(0, "val")
        repeats = 5 if K == 1000 else 20
        gain_times, refresh_times = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            gain_matrix(counts, trainer.centroids, weight, bias, trainer.objective)
            gain_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            trainer.refresh()  # the validation pass included
            refresh_times.append(time.perf_counter() - start)
        gain, refresh = statistics.median(gain_times), statistics.median(refresh_times)
        print(f"| {K} | {1e3 * gain:.1f} | {1e3 * refresh:.1f} | {refresh / gain:.2f} |")
    print("\ntarget: refresh <= 3x the gain at K = 1000")


# -- (c) quality -------------------------------------------------------------------------------------------


ROWS = {  # name -> config overrides (steps=0 is the starting head)
    "starting head": {"steps": 0, "eval_every": 50},
    "erm": {"method": "erm"},
    "uniform_mixup": {"method": "uniform_mixup"},
    "selmix (default)": {},
    "logit_adjust alone": {"steps": 0, "eval_every": 50, "posthoc": "logit_adjust"},
    "class_weights alone": {"steps": 0, "eval_every": 50, "posthoc": "class_weights"},
    "selmix + logit_adjust": {"posthoc": "logit_adjust"},
    "selmix + class_weights": {"posthoc": "class_weights"},
}


def bench_quality(args) -> None:
    results = {name: [] for name in ROWS}  # name -> [(min recall, mean recall), ...] per seed
    for seed in args.seeds:
        features = mnist_features(seed, args.cache_dir)
        for name, overrides in ROWS.items():
            config = FinetuneConfig.from_dict({"device": "cpu", "seed": seed, **overrides})
            last = finetune(features, config).metrics[-1]
            results[name].append((last["test_at_best/min_recall"], last["test_at_best/mean_recall"]))
        line = ", ".join(f"{name}: {values[-1][0]:.3f}" for name, values in results.items())
        print(f"seed {seed}: test min recall {line}", flush=True)

    best = np.max([[r[0] for r in values] for values in results.values()], axis=0)
    start = np.array([r[0] for r in results["starting head"]])
    print(f"\n### (c) mnist rho=100, default CNN, seeds {args.seeds[0]}-{args.seeds[-1]} "
          f"({len(args.seeds)} seeds), test metrics at the best validation report\n")
    print("| method | test min recall (mean ± std) | test mean recall (mean ± std) | min recall - start | "
          "wins (best min recall) |")
    print("|---|---|---|---|---|")
    for name, values in results.items():
        mins, means = np.array([r[0] for r in values]), np.array([r[1] for r in values])
        wins = int(np.sum(np.isclose(mins, best)))
        print(f"| {name} | {mins.mean():.3f} ± {mins.std(ddof=1) if len(mins) > 1 else 0:.3f} "
              f"| {means.mean():.3f} ± {means.std(ddof=1) if len(means) > 1 else 0:.3f} "
              f"| {np.mean(mins - start):+.3f} | {wins}/{len(mins)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["speed", "refresh", "quality", "all"])
    parser.add_argument("--seeds", type=parse_seeds, default=list(range(10)), help="e.g. 0-9 or 100-104")
    parser.add_argument("--seed", type=int, default=0, help="feature seed of the speed benchmark")
    parser.add_argument("--steps", type=int, default=2000, help="timed cached steps of the speed benchmark")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.which in ("speed", "all"):
        bench_speed(args)
    if args.which in ("refresh", "all"):
        bench_refresh(args)
    if args.which in ("quality", "all"):
        bench_quality(args)


if __name__ == "__main__":
    main()
