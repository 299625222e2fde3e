"""The experiment manifest ``selmix_run.json``: what a sweep was started with, so that ``resume`` and
``results`` need nothing else (the space, objective(s), feature key and build arguments, per-class training
counts, repeats, seed, scheduler, sampler, checkpoint cadence, storage and package versions).

A ``resume`` refuses a space that differs from the stored one (:func:`space_differences` names each
difference). ``MANIFEST_FORMAT`` changes only when an older reader could misread a newer manifest.
"""

from __future__ import annotations

import json
import math
import platform
import time
from typing import Any

from .constants import MANIFEST_FILE, SCORE_KEY
from .errors import ConfigError, ExperimentError

__all__ = ["MANIFEST_FORMAT", "build_manifest", "read_manifest", "space_differences", "sweep_steps", "metric_keys",
           "versions"]

MANIFEST_FORMAT = 1
CHECKPOINTS_PER_TRIAL = 10  # default checkpoint_every: about this many regular checkpoints per trial


def sweep_steps(search_space) -> tuple[int, int]:
    """(steps, eval_every) every trial of the sweep shares."""
    from .config import FinetuneConfig

    config = FinetuneConfig.from_dict({"objective": search_space.objective, **search_space.fixed})
    return config.steps, config.eval_every


def metric_keys(search_space) -> list[str]:
    """The reported key each objective is ranked by: the trained objective's score, then val/<name>."""
    from .constants import METRIC_NAMES

    keys = [SCORE_KEY]
    for name in search_space.objectives[1:]:
        if name not in METRIC_NAMES:
            raise ConfigError(
                f"a secondary objective must be one of the reported metrics ({', '.join(METRIC_NAMES)}), "
                f"but got {name!r}; make it the first objective or pick a reported metric.",
                where="search space")
        keys.append(f"val/{name}")
    return keys


def build_manifest(search_space, features, *, name, num_samples, max_concurrent, resources_per_trial, scheduler,
              sampler, repeats, seed, location, checkpoint_every=None) -> dict[str, Any]:
    steps, eval_every = sweep_steps(search_space)
    multi = search_space.is_multi_objective
    if checkpoint_every is None:
        checkpoint_every = max(1, math.ceil(steps // max(eval_every, 1) / CHECKPOINTS_PER_TRIAL))
    return {
        "format": MANIFEST_FORMAT,
        "name": name,
        "space": search_space.to_dict(),
        "objectives": list(search_space.objectives),
        "metrics": metric_keys(search_space),
        "mode": "max",
        "select": search_space.select,
        "feature_key": features.key,
        "feature_build_args": features.metadata.get("build_args"),
        "feature_nbytes": features.nbytes,
        "n_classes": features.n_classes,
        "train_counts": [int(count) for count in features.train_counts.tolist()],
        "repeats": repeats,
        "seed": seed,
        "num_samples": num_samples,
        "max_concurrent": max_concurrent,
        "resources_per_trial": dict(resources_per_trial or {"cpu": 1}),
        "scheduler": "none" if multi else scheduler,
        "sampler": "nsga2" if multi and sampler == "tpe" else sampler,
        "steps": steps,
        "eval_every": eval_every,
        "checkpoint_every": checkpoint_every,
        "storage": location.storage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(),
    }


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for package in ("selmix-ray", "ray", "optuna", "torch", "numpy"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def read_manifest(location) -> dict[str, Any]:
    if not location.exists(MANIFEST_FILE):
        raise ExperimentError(
            f"{location.path} is not a selmix-ray experiment: it has no {MANIFEST_FILE}. Pass the folder "
            "<storage>/<name> that search() created."
        )
    manifest = json.loads(location.read_bytes(MANIFEST_FILE))
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ExperimentError(f"{location.path}/{MANIFEST_FILE} has format {manifest.get('format')!r}; this "
                              f"selmix-ray reads format {MANIFEST_FORMAT}.")
    return manifest


def space_differences(stored: dict, given: dict) -> list[str]:
    """Human-readable differences between two canonical space dicts (SearchSpace.to_dict)."""
    out = []
    for key in ("objective", "objectives"):
        if stored.get(key) != given.get(key):
            out.append(f"it was started with {key} {stored.get(key)!r}, and this space asks for {given.get(key)!r}")
    for section in ("space", "fixed"):
        a, b = stored.get(section, {}), given.get(section, {})
        for field in sorted(set(a) | set(b)):
            if a.get(field) != b.get(field):
                out.append(f"{section}.{field} was {a.get(field, 'absent')!r} and is now {b.get(field, 'absent')!r}")
    return out
