"""Sweeps: Ray Tune runs the trials, Optuna proposes the configurations (SPEC.md sections 8 and 9).

``search`` builds one Tuner per experiment folder ``<storage>/<name>/``::

    OptunaSearch(define-by-run space, TPE | NSGA-II, study <name> in optuna_journal.log)
    ASHA on "step" (max_t = steps) | no scheduler (multi-objective, or scheduler="fifo")
    run_trial (trainable.py) with the features passed once through the object store

and adds what plain Ray Tune lacks:

- trials that ASHA stops early are told to Optuna as PRUNED (no value); a trial that reached ``steps``
  is COMPLETE, one that failed for good is FAIL;
- ASHA's state is written to ``scheduler_state.pkl`` at each experiment snapshot and restored by
  ``resume`` (Tune restores trials and the searcher, not the scheduler);
- on resume, Optuna trials asked after the last snapshot (RUNNING in the journal, unknown to Tune) are
  marked FAIL, so none stays RUNNING and the study ends with exactly ``num_samples`` COMPLETE + PRUNED;
  the folders such trials left (Tune never resumes them) are removed, so ``results`` sees exactly the
  ``num_samples`` Tune trials;
- the baselines (starting head, erm, uniform mixup, post-hoc corrections of the starting head) are
  computed on the driver before any trial, cached per feature key, and written to ``baselines.json``;
- ``selmix_run.json`` records the space, objective(s), feature key and build arguments, the per-class
  training counts, repeats, seed and versions; ``resume`` refuses a space that differs from it;
- trials checkpoint at step 0, every ``checkpoint_every``-th report, at ASHA's rungs and at the end (not at
  every report): a checkpoint holds the whole history, so checkpointing every report would write
  O(reports^2) bytes per trial and make Tune force an experiment snapshot every ``CHECKPOINTS_KEPT``
  checkpoints of a trial. A retried trial replays the few reports after its last checkpoint (same values);
- a Ray that ``search``/``resume`` initialised themselves is shut down when they return (a local one
  stops; a cluster reached through ``address`` is only disconnected); one the caller initialised is left
  as it is.

Storage may be a local or NFS path (a relative one is made absolute) or a pyarrow URI (``s3://``,
``gs://``, ``file://``). With a URI, the Optuna journal (which needs a POSIX file) lives on the driver's
disk and is copied into the experiment at each snapshot and at the end; ``resume`` brings it back.

Importing this module imports Ray Tune and Optuna but starts nothing (no ``ray.init``, no env vars).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from optuna.samplers import NSGAIISampler
from optuna.trial import TrialState
from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from .constants import (
    BASELINES_FILE,
    JOURNAL_FILE,
    MANIFEST_FILE,
    SCHEDULER_STATE_FILE,
    SCORE_KEY,
    STEP_KEY,
)
from .errors import ConfigError, ExperimentError

__all__ = ["search", "resume", "SCHEDULERS", "SAMPLERS", "StudySearch", "SnapshotCallback", "ProgressCallback"]

SCHEDULERS = ("asha", "fifo")  # asha: early stopping on "step"; fifo: every trial runs to the end
SAMPLERS = ("tpe", "nsga2", "random")  # tpe (default; NSGA-II when multi-objective), nsga2, random
MANIFEST_FORMAT = 1
MAX_FAILURES = 3  # retries of a failing trial, each from its last checkpoint
CHECKPOINTS_KEPT = 4  # per trial; the newest is what a retry resumes from (Tune forces an experiment
#                       snapshot each time a trial has written this many checkpoints since the last one)
CHECKPOINTS_PER_TRIAL = 10  # default checkpoint_every: about this many regular checkpoints per trial
ASHA_REDUCTION_FACTOR = 3
ASHA_GRACE_FRACTION = 1 / 9  # grace period ~ steps / 9, rounded up to a multiple of eval_every
_LOCK_TYPE = type(threading.Lock())
BASELINE_FORMAT = 2  # 2: each baseline also holds its val/test confusion counts at the best report


# -- public API ----------------------------------------------------------------------------------------


def search(
    space,
    *,
    features,
    storage: str | os.PathLike,
    name: str,
    num_samples: int,
    max_concurrent: int | None = None,
    resources_per_trial: dict[str, float] | None = None,
    scheduler: str = "asha",
    sampler: str = "tpe",
    repeats: int = 1,
    seed: int = 0,
    address: str | None = None,
    checkpoint_every: int | None = None,
):
    """Run a sweep of ``num_samples`` trials and return its ``results.Run``.

    Args:
        space: a YAML path, a dict in the layout of SPEC.md section 12, or a ``SearchSpace``.
        features: the FeatureSet every trial fine-tunes on (``build_features(...)``).
        storage: experiments folder (local/NFS path or pyarrow URI); the experiment is ``<storage>/<name>``.
        name: experiment name; an existing one is refused (continue it with :func:`resume`).
        num_samples: number of trials (configurations).
        max_concurrent: at most this many trials at once (default: as many as the resources allow).
        resources_per_trial: e.g. ``{"cpu": 1}`` (default) or ``{"cpu": 1, "gpu": 0.5}``.
        scheduler: ``"asha"`` (early stopping on ``step``) or ``"fifo"``; multi-objective spaces use none.
        sampler: ``"tpe"`` (NSGA-II when the space is multi-objective), ``"nsga2"`` or ``"random"``.
        repeats: seeds per configuration, trained in lockstep; trials report the mean (SPEC.md section 7).
        seed: seeds the sampler and the trials (copies use seed ... seed + repeats - 1).
        address: Ray cluster address (``"auto"``, ``"ray://..."``, ``host:port``) when Ray is not already
            initialised; default: start a local one. A Ray that search() started is shut down at the end.
        checkpoint_every: a trial checkpoints every this many reports (and always at step 0, at ASHA's
            rungs and at its last step); default: ceil(reports / 10), about 10 checkpoints per trial.
            1 checkpoints every report (a retry then replays nothing, but each report writes the
            whole history). Kept in the manifest, so ``resume`` uses the same.
    """
    _check_features(features)
    search_space = _load_space_checked(space, features)
    _check_search_options(num_samples=num_samples, max_concurrent=max_concurrent,
                          resources_per_trial=resources_per_trial, scheduler=scheduler, sampler=sampler,
                          repeats=repeats, seed=seed, name=name, checkpoint_every=checkpoint_every)
    location = _Location(storage, name)
    if location.exists(""):
        raise ExperimentError(
            f"An experiment named {name!r} already exists at {location.path}. Continue it with "
            f"resume({location.path!r}), or choose another name."
        )
    location.check_writable()

    manifest = _manifest(search_space, features, name=name, num_samples=num_samples,
                         max_concurrent=max_concurrent, resources_per_trial=resources_per_trial,
                         scheduler=scheduler, sampler=sampler, repeats=repeats, seed=seed, location=location,
                         checkpoint_every=checkpoint_every)
    location.write_bytes(MANIFEST_FILE, _json_bytes(manifest))
    _log(f"experiment {location.path}")

    baselines = _baselines(features, search_space, repeats=repeats, seed=seed)
    location.write_bytes(BASELINES_FILE, _json_bytes(baselines))

    started_ray = _init_ray(address)
    try:
        from ray import tune

        journal = _local_journal(location)
        tune_config, run_config = _tuner_configs(search_space, manifest, location, journal)
        tuner = tune.Tuner(_trainable(features, search_space, manifest, location), tune_config=tune_config,
                           run_config=run_config)
        _fit(tuner, location, journal)
    finally:
        _shutdown_ray(started_ray)
    return _load_run(location)


def resume(path: str | os.PathLike, *, features=None, address: str | None = None, space=None):
    """Continue the experiment at ``path`` (``<storage>/<name>``) and return its ``results.Run``.

    Finished trials stay as they are; unfinished and errored ones continue from their last checkpoint;
    ASHA's rungs and the Optuna study are restored. ``features`` default: rebuilt from the manifest's
    build arguments (a cache hit when the cache is still there). A ``space`` that differs from the stored
    one is refused, naming the differences.
    """
    location = _Location.of_experiment(path)
    manifest = _read_manifest(location)
    stored_space = _load_space_checked(manifest["space"], None)
    if space is not None:
        given = _load_space_checked(space, None)
        differences = _space_differences(manifest["space"], given.to_dict())
        if differences:
            raise ExperimentError(
                f"Cannot resume {location.path} with a different space: " + "; ".join(differences)
                + ". Resume without space=, or start a new experiment name."
            )
    if features is None:
        features = _rebuild_features(manifest, location)
    if features.key != manifest["feature_key"]:
        raise ExperimentError(
            f"Cannot resume {location.path}: it was run on features {manifest['feature_key']!r}, but the "
            f"features given have key {features.key!r}. Pass the same features, or none to rebuild them."
        )

    from ray import tune

    if not tune.Tuner.can_restore(location.path):
        raise ExperimentError(
            f"Cannot resume {location.path}: Ray Tune saved no experiment state there yet (the sweep was "
            "stopped before its first snapshot). Start it again with search() under a new name."
        )
    started_ray = _init_ray(address)
    try:
        journal = _local_journal(location, restore=True)
        _remove_orphan_trial_folders(location)
        trainable = _trainable(features, stored_space, manifest, location)
        tuner = tune.Tuner.restore(location.path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
        _log(f"resuming {location.path}")
        _fit(tuner, location, journal)
        # Again at the end: on a cluster that outlived the killed driver (address=..., or the test suite's),
        # Tune's final sync copies that driver's staged params.json/result.json of its orphans back.
        _remove_orphan_trial_folders(location, when="synced back at the end of the resumed run")
    finally:
        _shutdown_ray(started_ray)
    return _load_run(location)


# -- inputs --------------------------------------------------------------------------------------------


def _load_space_checked(space, features):
    from .space import SearchSpace, load_space

    if isinstance(space, SearchSpace):
        space = space.to_dict()
    return load_space(space, features=features)


def _check_search_options(*, num_samples, max_concurrent, resources_per_trial, scheduler, sampler, repeats,
                          seed, name, checkpoint_every=None) -> None:
    problems = []

    def positive_int(label, value, *, optional=False):
        if optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{label} must be an integer >= 1, but got {label}={value!r}.")

    positive_int("num_samples", num_samples)
    positive_int("max_concurrent", max_concurrent, optional=True)
    positive_int("repeats", repeats)
    positive_int("checkpoint_every", checkpoint_every, optional=True)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        problems.append(f"seed must be an integer >= 0, but got {seed=!r}.")
    if scheduler not in SCHEDULERS:
        problems.append(f"scheduler must be one of {', '.join(SCHEDULERS)}, but got {scheduler!r}.")
    if sampler not in SAMPLERS:
        problems.append(f"sampler must be one of {', '.join(SAMPLERS)}, but got {sampler!r}.")
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        problems.append(f"name must be a folder name (non-empty, no '/'), but got {name!r}.")
    if resources_per_trial is not None:
        if not isinstance(resources_per_trial, dict) or not resources_per_trial:
            problems.append(f"resources_per_trial must be a mapping such as {{'cpu': 1, 'gpu': 0.5}}, but got "
                            f"{resources_per_trial!r}.")
        else:
            for key, value in resources_per_trial.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                    problems.append(f"resources_per_trial[{key!r}] must be a number >= 0, but got {value!r}.")
    if problems:
        raise ConfigError(problems, where="search options")


def _check_features(features) -> None:
    from .featureset import FeatureSet

    if features is None:
        raise ConfigError(
            "features is required: build them first, e.g. features = build_features('digits', rho=10), and "
            "pass features=features.", where="search options")
    if not isinstance(features, FeatureSet):
        raise ConfigError(f"features must be a FeatureSet (from build_features), but got "
                          f"{type(features).__name__}.", where="search options")


def _sweep_steps(search_space) -> tuple[int, int]:
    """(steps, eval_every) every trial of the sweep shares."""
    from .config import FinetuneConfig

    config = FinetuneConfig.from_dict({"objective": search_space.objective, **search_space.fixed})
    return config.steps, config.eval_every


def _metric_keys(search_space) -> list[str]:
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


# -- manifest ------------------------------------------------------------------------------------------


def _manifest(search_space, features, *, name, num_samples, max_concurrent, resources_per_trial, scheduler,
              sampler, repeats, seed, location, checkpoint_every=None) -> dict[str, Any]:
    steps, eval_every = _sweep_steps(search_space)
    multi = search_space.is_multi_objective
    if checkpoint_every is None:
        checkpoint_every = max(1, math.ceil(steps // max(eval_every, 1) / CHECKPOINTS_PER_TRIAL))
    return {
        "format": MANIFEST_FORMAT,
        "name": name,
        "space": search_space.to_dict(),
        "objectives": list(search_space.objectives),
        "metrics": _metric_keys(search_space),
        "mode": "max",
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
        "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for package in ("selmix-ray", "ray", "optuna", "torch", "numpy"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def _read_manifest(location) -> dict[str, Any]:
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


def _space_differences(stored: dict, given: dict) -> list[str]:
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


def _rebuild_features(manifest, location):
    build_args = manifest.get("feature_build_args")
    if not build_args:
        raise ExperimentError(
            f"Cannot rebuild the features of {location.path}: its manifest has no build arguments (they were "
            "not made by build_features). Pass features= to resume.")
    from .features import rebuild_features

    _log("rebuilding features from the manifest's build arguments")
    return rebuild_features(build_args)


# -- baselines -----------------------------------------------------------------------------------------

BASELINES = {  # name -> overrides of the sweep's fixed values (steps = 0 is the starting head)
    "start": {"method": "erm", "steps": 0, "posthoc": "none"},
    "start+logit_adjust": {"method": "erm", "steps": 0, "posthoc": "logit_adjust"},
    "start+class_weights": {"method": "erm", "steps": 0, "posthoc": "class_weights"},
    "erm": {"method": "erm", "posthoc": "none"},
    "uniform_mixup": {"method": "uniform_mixup", "posthoc": "none"},
}


def _baselines(features, search_space, *, repeats: int, seed: int) -> dict[str, Any]:
    """Run the baselines on the driver (CPU); cached per feature key and settings."""
    from .engine import FinetuneConfig, finetune, finetune_repeats
    from .history import mean_best_recall, pooled_best_counts

    base = {"objective": search_space.objective, **search_space.fixed, "seed": seed, "device": "cpu"}
    configs = {name: FinetuneConfig.from_dict({**base, **overrides}) for name, overrides in BASELINES.items()}
    digest = hashlib.sha256(json.dumps(
        {"format": BASELINE_FORMAT, "configs": {k: c.to_dict() for k, c in configs.items()}, "repeats": repeats},
        sort_keys=True).encode()).hexdigest()[:16]
    cache_file = _baseline_cache_dir() / f"{features.key or 'nokey'}-{digest}.json"
    if features.key and cache_file.exists():
        _log(f"baselines: cached ({cache_file})")
        return json.loads(cache_file.read_text(encoding="utf-8"))

    out: dict[str, Any] = {"format": BASELINE_FORMAT, "feature_key": features.key, "repeats": repeats,
                           "baselines": {}}
    for name, config in configs.items():
        started = time.perf_counter()
        reports: list[dict[str, float]] = []
        if repeats == 1:
            histories = [finetune(features, config, report=reports.append)]
        else:
            histories = finetune_repeats(features, config, repeats=repeats, report=reports.append)
        out["baselines"][name] = {
            "config": config.to_dict(),
            "metrics": reports[-1],
            "n_classes": features.n_classes,
            "per_class_recall": mean_best_recall(histories),
            **pooled_best_counts(histories),
            "seconds": round(time.perf_counter() - started, 3),
        }
        _log(f"baseline {name:<20s} {SCORE_KEY}={reports[-1][SCORE_KEY]:.4f} "
             f"test_at_best/{search_space.objective}="
             f"{reports[-1].get('test_at_best/objective', float('nan')):.4f}")
    if features.key:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(out), encoding="utf-8")
        except OSError:
            pass  # a read-only cache only costs recomputation
    return out


def _baseline_cache_dir() -> Path:
    from .features import default_cache_dir

    return Path(default_cache_dir()) / "baselines"


# -- Ray Tune ------------------------------------------------------------------------------------------


def _init_ray(address: str | None) -> bool:
    """Reuse an initialised Ray; else connect to ``address`` or start a quiet local one.

    Returns True when this call initialised Ray (then :func:`_shutdown_ray` ends it), False when the
    caller had already done so (then it stays as it is).
    """
    import logging

    import ray

    if ray.is_initialized():
        return False
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, configure_logging=True)
    return True


def _shutdown_ray(started: bool) -> None:
    """Disconnect from (and, for a local one, stop) a Ray that search()/resume() initialised themselves."""
    if started:
        import ray

        ray.shutdown()


def _trainable(features, search_space, manifest, location):
    from ray import tune

    from .trainable import run_trial, trial_settings

    fault_dir = location.local_path or os.path.join(tempfile.gettempdir(), f"selmix_{location.name}")
    rungs = ()
    if manifest["scheduler"] == "asha":
        rungs = _asha_rungs(steps=manifest["steps"], eval_every=manifest["eval_every"])
    settings = trial_settings(search_space.to_dict(), repeats=manifest["repeats"], seed=manifest["seed"],
                              checkpoint_every=manifest.get("checkpoint_every", 1), checkpoint_steps=rungs,
                              fault_dir=fault_dir)
    resources = dict(manifest["resources_per_trial"])
    trainable = tune.with_parameters(run_trial, features=features.to_object_store(), settings=settings)
    return tune.with_resources(trainable, resources)


def _tuner_configs(search_space, manifest, location, journal: Path):
    """(TuneConfig, RunConfig): OptunaSearch + ASHA (or none), quiet loggers, retries, snapshots."""
    import optuna
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.search import ConcurrencyLimiter

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    metrics = manifest["metrics"]
    multi = len(metrics) > 1
    sampler = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=manifest["seed"]),
        "nsga2": lambda: PicklableNSGAIISampler(seed=manifest["seed"]),
        "random": lambda: optuna.samplers.RandomSampler(seed=manifest["seed"]),
    }[manifest["sampler"]]()
    searcher = StudySearch(
        space=search_space.define_by_run(),
        metric=metrics if multi else metrics[0],  # metric/mode go to OptunaSearch (and ASHA), not TuneConfig
        mode=["max"] * len(metrics) if multi else "max",
        sampler=sampler,
        study_name=manifest["name"],
        storage=_journal_storage(journal),
        steps=manifest["steps"],
    )
    search_alg = searcher
    if manifest["max_concurrent"]:
        search_alg = ConcurrencyLimiter(searcher, max_concurrent=manifest["max_concurrent"])
    scheduler = None
    if manifest["scheduler"] == "asha":
        scheduler = _asha(metric=metrics[0], steps=manifest["steps"], eval_every=manifest["eval_every"])
    tune_config = tune.TuneConfig(search_alg=search_alg, scheduler=scheduler,
                                  num_samples=manifest["num_samples"], reuse_actors=True)
    run_config = tune.RunConfig(
        name=location.name,
        storage_path=location.storage,
        failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
        callbacks=[
            JsonLoggerCallback(),
            CSVLoggerCallback(),
            SnapshotCallback(location, journal, scheduler),
            ProgressCallback(num_samples=manifest["num_samples"], steps=manifest["steps"], metric=metrics[0]),
        ],
        verbose=0,
    )
    return tune_config, run_config


def _asha(*, metric: str, steps: int, eval_every: int):
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr=STEP_KEY, metric=metric, mode="max", max_t=max(steps, 1),
                         grace_period=_asha_grace(steps=steps, eval_every=eval_every),
                         reduction_factor=ASHA_REDUCTION_FACTOR)


def _asha_grace(*, steps: int, eval_every: int) -> int:
    """ASHA's grace period in steps: ~ steps / 9, a multiple of eval_every (so every rung is a report)."""
    reports = max(steps // eval_every, 1)
    grace = eval_every * max(1, math.ceil(reports * ASHA_GRACE_FRACTION))
    return min(grace, max(steps, 1))


def _asha_rungs(*, steps: int, eval_every: int) -> list[int]:
    """The steps where ASHA may stop a trial: grace * 3^k up to ``steps`` (each is a report's step)."""
    grace, rungs = _asha_grace(steps=steps, eval_every=eval_every), []
    while grace <= steps:
        rungs.append(grace)
        grace *= ASHA_REDUCTION_FACTOR
    return rungs


def _remove_orphan_trial_folders(location, *, when: str = "started after the last snapshot") -> list[str]:
    """Delete trial folders that the newest experiment snapshot does not list; returns their names.

    A driver killed after starting a trial but before the next snapshot leaves that trial's folder
    (params.json, maybe results and checkpoints); Tune does not know the trial and never continues it.
    Where the Ray cluster outlives that driver, its staged files of those trials are still on the node,
    and the resumed run's final sync writes them back into the experiment: ``resume`` therefore calls
    this before and after the run. Nothing is deleted when no snapshot can be read.
    """
    names = _listdir(location)
    snapshots = sorted(n for n in names if n.startswith("experiment_state-") and n.endswith(".json"))
    if not snapshots:
        return []
    try:
        state = json.loads(location.read_bytes(snapshots[-1]))
        known = {json.loads(trial_json)["relative_logdir"] for trial_json, _ in state["trial_data"]}
    except (OSError, ValueError, KeyError, TypeError):
        return []
    orphans = [n for n in names if n not in known and location.exists(f"{n}/params.json")]
    for name in orphans:
        if location.fs is None:
            import shutil

            shutil.rmtree(os.path.join(location.path, name), ignore_errors=True)
        else:
            location.fs.delete_dir(location._fs_path(name))
    if orphans:
        _log(f"removed {len(orphans)} trial folder(s) unknown to Tune ({when}): {', '.join(orphans)}")
    return orphans


def _listdir(location) -> list[str]:
    """Names directly inside the experiment folder."""
    if location.fs is None:
        return sorted(os.listdir(location.path))
    import pyarrow.fs

    infos = location.fs.get_file_info(pyarrow.fs.FileSelector(location._fs_path("")))
    return sorted(info.base_name for info in infos)


def _fit(tuner, location, journal: Path) -> None:
    """Run the Tuner; the final snapshot (scheduler state, journal copy) is written at the end."""
    import logging

    # Every report carries a checkpoint, so Tune snapshots often and warns each time; the warning is noise.
    state_logger = logging.getLogger("ray.tune.execution.experiment_state")
    if not any(isinstance(f, _DropSnapshotWarning) for f in state_logger.filters):
        state_logger.addFilter(_DropSnapshotWarning())
    started = time.perf_counter()
    try:
        tuner.fit()
    finally:
        if location.is_uri and journal.exists():
            location.write_bytes(JOURNAL_FILE, journal.read_bytes())
    _log(f"done in {time.perf_counter() - started:.1f} s: {location.path}")


class _DropSnapshotWarning:
    """logging filter: drops Tune's 'snapshotting has been triggered multiple times' warning only."""

    def filter(self, record) -> bool:
        return "snapshotting has been triggered multiple times" not in record.getMessage()


def _load_run(location):
    from .results import load_run

    return load_run(location.local_path or location.path)


# -- Optuna --------------------------------------------------------------------------------------------


def _journal_storage(path: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def _local_journal(location, *, restore: bool = False) -> Path:
    """The journal file Optuna writes: in the experiment (local storage) or on the driver's disk (URI).

    With ``restore``, a URI experiment's copy replaces the local file when it is longer (the journal only
    grows, so the longer one is the newer).
    """
    if not location.is_uri:
        return Path(location.path) / JOURNAL_FILE
    from .features import default_cache_dir

    digest = hashlib.sha256(location.path.encode()).hexdigest()[:16]
    local = Path(default_cache_dir()) / "journals" / digest / JOURNAL_FILE
    local.parent.mkdir(parents=True, exist_ok=True)
    if restore and location.exists(JOURNAL_FILE):
        stored = location.read_bytes(JOURNAL_FILE)
        if not local.exists() or local.stat().st_size < len(stored):
            local.write_bytes(stored)
    return local


def _tell(study, trial, **kwargs) -> bool:
    """``study.tell`` that tolerates a trial already finished (a restored trial may be told twice)."""
    try:
        study.tell(trial, **kwargs)
        return True
    except (ValueError, RuntimeError):
        return False


class PicklableNSGAIISampler(NSGAIISampler):
    """Optuna's NSGAIISampler, made picklable (Tune pickles the searcher into the experiment state).

    Optuna 5.1's NSGAIISampler holds a ``threading.Lock`` (``_thread_lock``) that pickle refuses; this
    subclass leaves the lock out of its state and gives a restored sampler a fresh one.
    """

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not isinstance(v, _LOCK_TYPE)}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


class StudySearch(OptunaSearch):
    """OptunaSearch that tells PRUNED trials, tolerates re-told trials and fails orphans on restore.

    Args (besides OptunaSearch's): steps, the sweep's step count: a trial that ends before it was
    stopped by the scheduler and is told PRUNED (no value; telling PRUNED with a value raises in Optuna).

    The study never holds a finished trial that the experiment's snapshot does not know. A trial that
    started after the last snapshot (``save``) and finishes before the next one is told to Optuna at that
    next snapshot, not at once: if the driver dies in between, Tune forgets the trial, and ``restore``
    then marks its Optuna trial FAIL (a finished trial could no longer be changed, and the study would end
    with more COMPLETE + PRUNED trials than the experiment has). Trials the last snapshot knows are told
    at once. Tune snapshots every few trial checkpoints (``CHECKPOINTS_KEPT``), so the delay is short.
    """

    def __init__(self, *, steps: int, **kwargs):
        super().__init__(**kwargs)
        self._steps = steps
        self._in_snapshot: set[str] = set()  # trial ids the last snapshot knows
        self._untold: dict[str, dict] = {}  # trial id -> _tell kwargs, held until the next snapshot

    def save(self, checkpoint_path: str) -> None:
        for trial_id, outcome in self._untold.items():  # Tune wrote this snapshot's trial states just before
            _tell(self._ot_study, self._ot_trials[trial_id], **outcome)
        self._untold = {}
        self._in_snapshot = set(self._ot_trials)
        super().save(checkpoint_path)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, list) or trial_id in self._completed_trials:
            return
        try:  # intermediate values for optuna-dashboard, indexed by step
            self._ot_trials[trial_id].report(float(result[self.metric]), int(result[STEP_KEY]))
        except (RuntimeError, ValueError, KeyError):
            pass  # e.g. a restored trial that Optuna already saw finish

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        values = [None if not result else result.get(m) for m in metrics]
        finished = bool(result) and result.get(STEP_KEY, -1) >= self._steps
        if error or not result or any(v is None or not math.isfinite(v) for v in values):
            outcome = {"state": TrialState.FAIL}
        elif not finished:  # stopped early by the scheduler
            outcome = {"state": TrialState.PRUNED}
        else:
            outcome = {"values": values if len(values) > 1 else values[0], "state": TrialState.COMPLETE}
        if trial_id in self._in_snapshot:
            _tell(self._ot_study, ot_trial, **outcome)
        else:
            self._untold[trial_id] = outcome
        self._completed_trials.add(trial_id)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self.__dict__.setdefault("_untold", {})  # a state saved before these attributes existed
        self._in_snapshot = set(self._ot_trials)
        known = {ot_trial.number for ot_trial in self._ot_trials.values()}
        for trial in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.number not in known:  # asked after the last snapshot: Tune never recorded it
                _tell(self._ot_study, trial.number, state=TrialState.FAIL)


# -- snapshots and progress ----------------------------------------------------------------------------


class SnapshotCallback(Callback):
    """Persists ASHA's state (and a URI experiment's journal) at every experiment snapshot, and restores
    ASHA's state when the experiment starts again (``resume``).

    Tune calls ``get_state`` of every callback when it saves the experiment state (every ~10 s and at the
    end): that is when ``scheduler_state.pkl`` is written; it returns None (nothing for Tune to keep).
    """

    def __init__(self, location: _Location, journal: Path, scheduler=None):
        self.location = location
        self.journal = journal
        self.scheduler = scheduler

    def setup(self, **info) -> None:
        if self.scheduler is not None and self.location.exists(SCHEDULER_STATE_FILE):
            with tempfile.TemporaryDirectory() as folder:
                path = os.path.join(folder, SCHEDULER_STATE_FILE)
                Path(path).write_bytes(self.location.read_bytes(SCHEDULER_STATE_FILE))
                self.scheduler.restore(path)

    def get_state(self):
        self.snapshot()
        return None

    def on_experiment_end(self, trials, **info) -> None:
        self.snapshot()

    def snapshot(self) -> None:
        if self.scheduler is not None:
            with tempfile.TemporaryDirectory() as folder:
                path = os.path.join(folder, SCHEDULER_STATE_FILE)
                self.scheduler.save(path)
                self.location.write_bytes(SCHEDULER_STATE_FILE, Path(path).read_bytes())
        if self.location.is_uri and self.journal.exists():
            self.location.write_bytes(JOURNAL_FILE, self.journal.read_bytes())


class ProgressCallback(Callback):
    """One line on the driver per finished, failed or retried trial (instead of Tune's tables)."""

    def __init__(self, *, num_samples: int, steps: int, metric: str):
        self.num_samples = num_samples
        self.steps = steps
        self.metric = metric
        self.finished = 0
        self.best = -math.inf

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.finished += 1
        result = trial.last_result or {}
        score = result.get(self.metric, math.nan)
        if math.isfinite(score):
            self.best = max(self.best, score)
        step = int(result.get(STEP_KEY, 0))
        how = "complete" if step >= self.steps else f"pruned at step {step}"
        _log(f"trial {self.finished}/{self.num_samples} {trial.trial_id} {how}: {self.metric}={score:.4f} "
             f"(best {self.best:.4f})")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.finished += 1
        _log(f"trial {trial.trial_id} failed for good after {MAX_FAILURES} retries; see {trial.path}")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        _log(f"trial {trial.trial_id} raised; retrying it from its last checkpoint")


def _log(message: str) -> None:
    """Driver progress: one concise line (not Tune's tables)."""
    print(f"[selmix-ray] {message}", file=sys.stdout, flush=True)


# -- storage -------------------------------------------------------------------------------------------


class _Location:
    """An experiment folder ``<storage>/<name>`` on a local path or a pyarrow filesystem URI."""

    def __init__(self, storage: str | os.PathLike, name: str):
        storage = os.fspath(storage)
        self.name = name
        self.is_uri = "://" in storage
        if self.is_uri:
            import pyarrow.fs

            self.fs, self.fs_storage = pyarrow.fs.FileSystem.from_uri(storage)
            self.storage = storage.rstrip("/")
            self.path = f"{self.storage}/{name}"
            local = isinstance(self.fs, pyarrow.fs.LocalFileSystem)
            self.local_path = f"{self.fs_storage}/{name}" if local else None
        else:
            self.fs = None
            self.storage = os.path.abspath(os.path.expanduser(storage))
            self.path = os.path.join(self.storage, name)
            self.local_path = self.path

    @classmethod
    def of_experiment(cls, path: str | os.PathLike) -> _Location:
        text = os.fspath(path).rstrip("/")
        if "://" in text:
            storage, _, name = text.rpartition("/")
            return cls(storage, name)
        text = os.path.abspath(os.path.expanduser(text))
        return cls(os.path.dirname(text), os.path.basename(text))

    def _fs_path(self, relative: str) -> str:
        base = f"{self.fs_storage}/{self.name}"
        return f"{base}/{relative}" if relative else base

    def exists(self, relative: str) -> bool:
        if self.fs is None:
            return os.path.exists(os.path.join(self.path, relative) if relative else self.path)
        import pyarrow.fs

        return self.fs.get_file_info(self._fs_path(relative)).type != pyarrow.fs.FileType.NotFound

    def read_bytes(self, relative: str) -> bytes:
        if self.fs is None:
            return Path(self.path, relative).read_bytes()
        with self.fs.open_input_stream(self._fs_path(relative)) as stream:
            return stream.read()

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write a whole file; local writes go through a temporary file and a rename (atomic)."""
        if self.fs is None:
            target = Path(self.path, relative)
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.tmp")
            temporary.write_bytes(data)
            os.replace(temporary, target)
            return
        self.fs.create_dir(self._fs_path(""), recursive=True)
        with self.fs.open_output_stream(self._fs_path(relative)) as stream:
            stream.write(data)

    def check_writable(self) -> None:
        """Create the experiment folder, or raise ExperimentError saying why it cannot be."""
        probe = ".selmix_write_probe"
        try:
            self.write_bytes(probe, b"ok")
            if self.fs is None:
                os.remove(os.path.join(self.path, probe))
            else:
                self.fs.delete_file(self._fs_path(probe))
        except OSError as error:
            raise ExperimentError(
                f"Cannot write to storage {self.storage!r} ({error.__class__.__name__}: {error}). Pass a "
                "writable folder or URI as storage=."
            ) from error


def _json_bytes(value) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=False, default=str) + "\n").encode()

