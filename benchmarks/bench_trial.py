"""Where one head-only SelMix trial spends its time, at K = 100 and K = 1000 (issue 12, item 3).

    .venv/bin/python benchmarks/bench_trial.py                            # K = 100 and 1000, 200 steps, class_weights
    .venv/bin/python benchmarks/bench_trial.py --classes 1000 --steps 2000 --eval-every 50 --posthoc none \
        --refresh-every 1000                        # a 2000-step trial's folder (sizes do not depend on refreshes)
    .venv/bin/python benchmarks/bench_trial.py --folder /tmp/bt --keep   # keep the npz files and the cache

The data are bench_scale.py's seeded Gaussian clusters (ImageNet-LT shape by default: d = 512, 1280 down
to 5 training rows per class, 20 validation and 50 test rows per class), built through the npz path with
``backbone="identity"`` (the ERM head is fitted once and cached under the folder). One trial runs in this
process with ``finetune`` and a checkpoint callback that writes what a Tune trial writes
(``finetune_state.pt`` with an empty history + ``history.json``, trainable.py) at the reports a sweep
checkpoints by default (about ``CHECKPOINTS_PER_TRIAL``), keeping the newest ``CHECKPOINTS_KEPT`` as Tune does, so the folder it leaves is a trial's experiment folder
less Tune's scalar logs.

Every part is timed by wrapping the function that does it (outermost call only, no profiler overhead):

- gain refresh: ``Trainer._refresh`` (validation logits, confusion, multipliers, gain, P, alias tables),
  with the gain (``gain_matrix``), P (``pair_distribution``) and the alias tables (``set_distribution``);
- pair sampling: ``PairSampler.sample`` (class pairs and rows); mixing and gathering: the rest of ``draw``;
- training steps: ``HeadModel.step``;
- evaluation: ``Trainer._report`` without the post-hoc fit, with the logits/arg-max passes;
- post-hoc fit: ``cross_fitted_predictions`` (validation) + ``fit_correction`` (test);
- checkpoint: ``Trainer.state`` + writing the state file and ``history.json``; their sizes at the end.

Prints one table per K; the load average at the start (the machine may be shared: times are wall-clock).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench_scale import generate  # benchmarks/ is on sys.path when run as a script

PARTS = (
    ("gain refresh (all)", "selmix_ray.engine", "Trainer._refresh"),
    ("  gain matrix", "selmix_ray.engine", "gain_matrix"),
    ("  P from the gain", "selmix_ray.engine", "pair_distribution"),
    ("  alias tables", "selmix_ray.sampling", "PairSampler.set_distribution"),
    ("pair sampling", "selmix_ray.sampling", "PairSampler.sample"),
    ("draw (sampling + gather + mix)", "selmix_ray.models", "_Model.draw"),
    ("training steps", "selmix_ray.models", "HeadModel.step"),
    ("report (evaluation + post-hoc)", "selmix_ray.engine", "Trainer._report"),
    ("  logits passes", "selmix_ray.engine", "_logits"),
    ("  arg-max passes", "selmix_ray.engine", "_predict"),
    ("  metrics (summarize)", "selmix_ray.engine", "summarize"),
    ("  sparse counts", "selmix_ray.engine", "sparse_counts"),
    ("  post-hoc, cross-fitted (val)", "selmix_ray.engine", "cross_fitted_predictions"),
    ("  post-hoc, full fit (test)", "selmix_ray.engine", "fit_correction"),
    ("checkpoint: state snapshot", "selmix_ray.engine", "Trainer.state"),
)


class Timer:
    """Accumulates the wall time of wrapped functions (outermost call of each part only)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._depth: dict[str, int] = {}

    def wrap(self, module, dotted: str, part: str) -> None:
        owner_name, _, attr = dotted.rpartition(".")
        owner = getattr(module, owner_name) if owner_name else module
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            self._depth[part] = self._depth.get(part, 0) + 1
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._depth[part] -= 1
                if self._depth[part] == 0:
                    self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - started
                    self.calls[part] = self.calls.get(part, 0) + 1

        setattr(owner, attr, timed)

    def add(self, part: str, seconds: float) -> None:
        self.seconds[part] = self.seconds.get(part, 0.0) + seconds
        self.calls[part] = self.calls.get(part, 0) + 1


def build(npz: Path, cache: Path, dtype: str, head_epochs: float | None = None):
    from selmix_ray.features import build_features

    started = time.perf_counter()
    opts = {} if head_epochs is None else {"head_epochs": head_epochs}
    fs = build_features("npz", rho=None, backbone="identity", root=str(npz), cache_dir=str(cache), dtype=dtype,
                        progress=False, **opts)
    return fs, time.perf_counter() - started


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def run_trial(fs, args, trial_dir: Path) -> dict:
    """One profiled trial; checkpoints as a Tune trial writes them, the newest CHECKPOINTS_KEPT kept."""
    import importlib

    from selmix_ray import FinetuneConfig, finetune
    from selmix_ray.constants import HISTORY_FILE, STATE_FILE
    from selmix_ray.history import History
    from selmix_ray.manifest import CHECKPOINTS_PER_TRIAL
    from selmix_ray.sweep import CHECKPOINTS_KEPT
    from selmix_ray.trainable import _CheckpointSchedule

    timer = Timer()
    for part, module_name, dotted in PARTS:
        timer.wrap(importlib.import_module(module_name), dotted, part)
    kept: list[Path] = []
    sizes = {}

    every = max(1, -(-(args.steps // args.eval_every) // CHECKPOINTS_PER_TRIAL))  # the sweep's default
    schedule = _CheckpointSchedule(steps=args.steps, eval_every=args.eval_every, every=every)

    def checkpoint(state) -> None:
        import dataclasses

        if not schedule(state.step):
            return
        started = time.perf_counter()
        folder = trial_dir / f"checkpoint_{len(sizes):06d}"
        folder.mkdir(parents=True)
        dataclasses.replace(state, history=History()).save(folder / STATE_FILE)
        (folder / HISTORY_FILE).write_text(state.history.to_json(), encoding="utf-8")
        timer.add("checkpoint: write state + history", time.perf_counter() - started)
        sizes[state.step] = ((folder / STATE_FILE).stat().st_size, (folder / HISTORY_FILE).stat().st_size)
        kept.append(folder)
        while len(kept) > CHECKPOINTS_KEPT:
            shutil.rmtree(kept.pop(0))

    config = FinetuneConfig(steps=args.steps, eval_every=args.eval_every, posthoc=args.posthoc, device="cpu",
                            refresh_every=getattr(args, "refresh_every", None) or FinetuneConfig.refresh_every)
    started = time.perf_counter()
    history = finetune(fs, config, checkpoint=checkpoint)
    wall = time.perf_counter() - started
    for module_name, dotted in {(m, d) for _, m, d in PARTS}:  # unwrap: the next trial wraps afresh
        module = importlib.import_module(module_name)
        owner_name, _, attr = dotted.rpartition(".")
        owner = getattr(module, owner_name) if owner_name else module
        setattr(owner, attr, getattr(owner, attr).__wrapped__)
    last_state, last_history = sizes[max(sizes)]
    return {"wall_s": wall, "seconds": timer.seconds, "calls": timer.calls, "reports": len(history.records),
            "state_bytes": last_state, "history_bytes": last_history, "folder_bytes": folder_bytes(trial_dir),
            "val_objective": history.records[-1]["metrics"]["val/objective"]}


def print_trial(label: str, r: dict) -> None:
    print(f"\n{label}: {r['wall_s']:.1f} s wall for {r['reports']} reports; final val objective "
          f"{r['val_objective']:.4f}")
    rows = [(part, r["seconds"].get(part, 0.0), r["calls"].get(part, 0)) for part, _, _ in PARTS]
    rows.append(("checkpoint: write state + history", r["seconds"].get("checkpoint: write state + history", 0.0),
                 r["calls"].get("checkpoint: write state + history", 0)))
    for part, seconds, calls in rows:
        share = 100 * seconds / r["wall_s"] if r["wall_s"] else 0.0
        print(f"  {part:<36} {seconds:8.2f} s  {share:5.1f}%  ({calls} calls)")
    print(f"  last checkpoint: state file {r['state_bytes'] / 1e6:.2f} MB, history.json {r['history_bytes'] / 1e6:.2f} MB; "
          f"trial folder (newest checkpoints kept) {r['folder_bytes'] / 1e6:.1f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=[100, 1000], help="K values (default 100 1000)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--n-max", type=int, default=1280)
    parser.add_argument("--n-min", type=int, default=5)
    parser.add_argument("--n-val", type=int, default=20)
    parser.add_argument("--n-test", type=int, default=50)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--posthoc", default="class_weights", help="none | logit_adjust | class_weights")
    parser.add_argument("--refresh-every", type=int, default=None,
                        help="refresh_every (default the config's 10; larger: a long trial's sizes sooner)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--head-epochs", type=float, default=None, help="the build's head_epochs (default its own)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--folder", help="npz files, cache and trial folders (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.folder or tempfile.mkdtemp(prefix="bench-trial-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"load average at start: {os.getloadavg()}; cpus {os.cpu_count()}; torch threads {torch.get_num_threads()}; "
          f"steps {args.steps}, eval_every {args.eval_every}, posthoc {args.posthoc}")
    try:
        for classes in args.classes:
            npz = folder / f"k{classes}_d{args.dim}.npz"
            if not npz.exists():
                generate(npz, classes=classes, dim=args.dim, n_max=args.n_max, rho=args.n_max / args.n_min,
                         n_val=args.n_val, n_test=args.n_test, scale=0.2, noise=1.0, seed=args.seed)
            fs, seconds = build(npz, folder / "cache", args.dtype, args.head_epochs)
            trial_dir = folder / f"trial_k{classes}"
            shutil.rmtree(trial_dir, ignore_errors=True)
            result = run_trial(fs, args, trial_dir)
            print_trial(f"K={classes} (train {len(fs.train.y)}, val {len(fs.val.y)}, test {len(fs.test.y)} rows; "
                        f"features {'cached' if fs.metadata['cache_hit'] else 'built'} in {seconds:.1f} s)", result)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
