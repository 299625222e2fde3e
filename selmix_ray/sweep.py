"""Sweeps: Ray Tune runs the trials, Optuna proposes the configurations (docs/architecture.md).

``search`` builds one Tuner per experiment folder ``<storage>/<name>/``::

    OptunaSearch(define-by-run space, TPE | NSGA-II, study <name> in optuna_journal.log)
    ASHA on "step" (max_t = steps) | no scheduler (multi-objective, or scheduler="fifo")
    run_trial (trainable.py) with the features passed once through the object store

and adds what plain Ray Tune lacks:

- trials that ASHA stops early are told to Optuna as PRUNED (no value); a trial that reached ``steps``
  is COMPLETE, one that failed for good is FAIL;
- ASHA's state is written to ``scheduler_state.pkl`` at each experiment snapshot and restored by
  ``resume`` (Tune restores trials and the searcher, not the scheduler);
- a finished trial is told to Optuna only once Tune's snapshot on storage lists it; on resume, Optuna
  trials that the restored snapshot does not list (started by a killed driver after its last snapshot
  reached storage) are marked FAIL and replaced (``tune_adapter.StudySearch``, ``StudySearchGenerator``),
  so the study ends with exactly ``num_samples`` COMPLETE + PRUNED; the folders they left are moved to
  ``orphaned_trials/`` (never deleted), so ``results`` sees exactly the ``num_samples`` Tune trials;
- the baselines (starting head, erm, uniform mixup, post-hoc corrections of the starting head) are
  computed on the driver before any trial, cached per feature key, and written to ``baselines.json``;
- ``selmix_run.json`` records the space, objective(s), feature key and build arguments, the per-class
  training counts, repeats, seed and versions; ``resume`` refuses a space that differs from it;
- trials checkpoint at step 0, every ``checkpoint_every``-th report, at ASHA's rungs and at the end (not at
  every report): a checkpoint holds the whole history, so checkpointing every report would write
  O(reports^2) bytes per trial. A retried trial replays the few reports after its last checkpoint (same
  values);
- Tune keeps every checkpoint (``num_to_keep=None``): with a limit, Tune deletes a trial's older
  checkpoints while the experiment snapshot on storage still lists them, and a driver killed in that
  window leaves a snapshot whose trial cannot be restored ("does not exist on storage anymore"; about 1
  resume in 5 on a cluster that outlived its driver). ``resume`` moves to ``orphaned_trials/``, at its end and
  under the lock, the checkpoints that no longer appear in the final snapshot (those a killed driver wrote
  after its last snapshot): nothing restores from them, and ``results`` would read them as a trial's newest;
- a Ray that ``search``/``resume`` initialised themselves is shut down when they return (a local one
  stops; a cluster reached through ``address`` is only disconnected); one the caller initialised is left
  as it is.

Storage may be a local or NFS path (a relative one is made absolute) or a pyarrow URI (``s3://``,
``gs://``, ``file://``). With a URI, the Optuna journal (which needs a POSIX file) lives on the driver's
disk and is copied into the experiment at each snapshot and at the end; ``resume`` brings it back.

Where the parts live: the experiment folder and the journal file in ``storage``; the baselines in
``baselines``; everything that touches Ray's or Optuna's private internals (the searcher subclass, the
picklable NSGA-II sampler, the snapshot callback, Tune's experiment-state files, the log filter) in
``tune_adapter``. This module keeps the public ``search``/``resume``, their checks, the manifest, Ray's
start and stop, and the Tuner's configuration.

Importing this module imports Ray Tune and Optuna but starts nothing (no ``ray.init``, no env vars).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .baselines import compute_baselines
from .checks import int_problem, is_number
from .cluster import check_resources, init_ray, shutdown_ray
from .constants import BASELINES_FILE, JOURNAL_FILE, MANIFEST_FILE, MAX_FAILURES, STEP_KEY
from .errors import ConfigError, ExperimentError
from .journal import check_journal
from .manifest import build_manifest, read_manifest, space_differences
from .orphans import listed_trials, set_aside_orphan_trial_folders, set_aside_unlisted_checkpoints
from .ownership import ExperimentLock
from .progress import ProgressCallback, log
from .storage import Location, journal_storage, json_bytes, local_journal
from .tune_adapter import (
    PicklableNSGAIISampler,
    SnapshotCallback,
    StudySearch,
    StudySearchGenerator,
    damaged_snapshot_files,
    quiet_snapshot_warning,
    use_current_objects,
)

__all__ = ["search", "resume", "SCHEDULERS", "SAMPLERS", "StudySearch", "SnapshotCallback", "ProgressCallback",
           "PicklableNSGAIISampler"]

SCHEDULERS = ("asha", "fifo")  # asha: early stopping on "step"; fifo: every trial runs to the end
SAMPLERS = ("tpe", "nsga2", "random")  # tpe (default; NSGA-II when multi-objective), nsga2, random
ASHA_REDUCTION_FACTOR = 3
ASHA_GRACE_FRACTION = 1 / 9  # grace period ~ steps / 9, rounded up to a multiple of eval_every
_Location = Location  # the name that experiments started before storage.py pickled (resume unpickles it)


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
    callbacks: list | None = None,
    time_budget_s: float | None = None,
    stop=None,
    select: str | None = None,
    connect_timeout_s: float | None = None,
):
    """Run a sweep of ``num_samples`` trials and return its ``results.Run``.

    Args:
        space: a YAML path, a dict in the layout of docs/method.md (Search spaces), or a ``SearchSpace``.
        features: the FeatureSet every trial fine-tunes on (``build_features(...)``).
        storage: experiments folder (local/NFS path or pyarrow URI); the experiment is ``<storage>/<name>``.
        name: experiment name; an existing one is refused (continue it with :func:`resume`).
        num_samples: number of trials (configurations).
        max_concurrent: at most this many trials at once (default: as many as the resources allow).
        resources_per_trial: e.g. ``{"cpu": 1}`` (default) or ``{"cpu": 1, "gpu": 0.5}``.
        scheduler: ``"asha"`` (early stopping on ``step``) or ``"fifo"``; multi-objective spaces use none.
        sampler: ``"tpe"`` (NSGA-II when the space is multi-objective), ``"nsga2"`` or ``"random"``.
        repeats: seeds per configuration, trained in lockstep; trials report the mean (docs/method.md, One trial).
        seed: seeds the sampler and the trials (copies use seed ... seed + repeats - 1).
        address: Ray cluster address (``"auto"``, ``"ray://..."``, ``host:port``) when Ray is not already
            initialised; default: start a local one. A Ray that search() started is shut down at the end.
        checkpoint_every: checkpoint every this many reports (and at step 0, ASHA's rungs and the last
            step); default ceil(reports / 10). 1: a retry replays nothing, each report writes the history.
        callbacks: Ray Tune callbacks to add, objects or the names "tensorboard", "mlflow", "wandb"
            (selmix_ray.ecosystem). JSON and CSV results, and TensorBoard files when tensorboardX is
            installed, are always written.
        time_budget_s: stop the sweep after this many seconds (Tune's TuneConfig.time_budget_s).
        stop: Tune's RunConfig.stop (dict, function or Stopper); a trial it ends early counts pruned.
        select: selection rule, "max" or "lcb", over the space's ``select`` (selmix_ray.confidence).
        connect_timeout_s: how long an ``address`` where nothing listens is retried (default 30 s).
    Refused when no node can run a trial; SweepFailedError when every trial errored (cluster, faults).
    """
    _check_features(features)
    _check_tune_options(callbacks=callbacks, time_budget_s=time_budget_s, stop=stop)
    search_space = _load_space_checked(space, features, select=select)
    options = _check_search_options(num_samples=num_samples, max_concurrent=max_concurrent,
                                    resources_per_trial=resources_per_trial, scheduler=scheduler, sampler=sampler,
                                    repeats=repeats, seed=seed, name=name, checkpoint_every=checkpoint_every)
    location = Location(storage, name)
    if location.exists(""):
        raise ExperimentError(
            f"An experiment named {name!r} already exists at {location.path}. Continue it with "
            f"resume({location.path!r}), or choose another name."
        )
    location.check_writable()  # creates the (empty) experiment folder
    with ExperimentLock(location, "search"):
        if location.exists(MANIFEST_FILE):  # another search of this name got there first
            raise ExperimentError(f"An experiment named {name!r} was just created at {location.path} by another "
                                  "process. Choose another name.")
        return _search_locked(search_space, features, location, options, address=address,
                              connect_timeout_s=connect_timeout_s, callbacks=callbacks, time_budget_s=time_budget_s,
                              stop=stop)


def _search_locked(search_space, features, location, options, *, address, connect_timeout_s, callbacks,
                   time_budget_s, stop):
    started_ray = _start_ray_checked(location, address, connect_timeout_s, options, search_space)
    try:
        manifest = build_manifest(search_space, features, location=location, **options)
        location.write_bytes(MANIFEST_FILE, json_bytes(manifest))
        log(f"experiment {location.path}")
        baselines = compute_baselines(features, search_space, repeats=manifest["repeats"], seed=manifest["seed"],
                                      log=log)
        location.write_bytes(BASELINES_FILE, json_bytes(baselines))
        from ray import tune

        journal = local_journal(location)
        tune_config, run_config = _tuner_configs(search_space, manifest, location, journal, callbacks=callbacks,
                                                 time_budget_s=time_budget_s, stop=stop)
        tuner = tune.Tuner(_trainable(features, search_space, manifest, location), tune_config=tune_config,
                           run_config=run_config)
        _fit(tuner, location, journal)
    finally:
        shutdown_ray(started_ray)
    return _load_run(location, verdict=True)


def resume(path: str | os.PathLike, *, features=None, address: str | None = None, space=None,
           connect_timeout_s: float | None = None):
    """Continue the experiment at ``path`` (``<storage>/<name>``) and return its ``results.Run``.

    Finished trials stay as they are; unfinished and errored ones continue from their last checkpoint;
    ASHA's rungs and the Optuna study are restored. ``features`` default: rebuilt from the manifest's
    build arguments (a cache hit when the cache is still there). A ``space`` that differs from the stored
    one is refused, naming the differences.
    """
    location = Location.of_experiment(path)
    manifest = read_manifest(location)
    with ExperimentLock(location, "resume") as lock:
        return _resume_locked(location, manifest, lock, features=features, address=address, space=space,
                              connect_timeout_s=connect_timeout_s)


def _resume_locked(location, manifest, lock, *, features, address, space, connect_timeout_s):
    stored_space, features = _resume_inputs(location, manifest, features=features, space=space)
    from ray import tune

    if not tune.Tuner.can_restore(location.path):
        raise ExperimentError(
            f"Cannot resume {location.path}: Ray Tune saved no experiment state there yet (the sweep was "
            "stopped before its first snapshot). Start it again with search() under a new name."
        )
    damaged = damaged_snapshot_files(location.listdir(), location.read_bytes)
    if damaged:
        raise ExperimentError(
            f"Cannot resume {location.path}: Ray Tune's snapshot files {', '.join(damaged)} are truncated (the "
            "driver was killed while Tune was writing them), so Tune would restore no trial. The finished "
            "trials stay readable (compare, load_run); start the sweep again with search() under a new name.")
    journal = local_journal(location, restore=True)
    listed = listed_trials(location)
    check_journal(journal, study_name=manifest["name"], tune_trials=listed)  # before anything is written
    started_ray = init_ray(address, connect_timeout_s=connect_timeout_s)
    try:
        check_resources(manifest["resources_per_trial"], devices=[stored_space.fixed.get("device", "auto")])
        set_aside_orphan_trial_folders(location, lock)
        tuner = tune.Tuner.restore(location.path, trainable=_trainable(features, stored_space, manifest, location),
                                   resume_unfinished=True, resume_errored=True)
        _use_this_place(tuner, stored_space, manifest, location, journal)
        log(f"resuming {location.path}")
        _fit(tuner, location, journal)
        # Again at the end: on a cluster that outlived the killed driver (address=..., or the test suite's),
        # Tune's final sync copies that driver's staged params.json/result.json of its orphans back.
        set_aside_orphan_trial_folders(location, lock, when="synced back at the end of the resumed run")
        set_aside_unlisted_checkpoints(location, lock)
        if listed_trials(location) < listed:
            raise ExperimentError(f"Resuming {location.path} restored fewer trials than its snapshot listed "
                                  f"({listed_trials(location)} of {listed}); its files are damaged.")
    finally:
        shutdown_ray(started_ray)
    return _load_run(location, verdict=True)


def _resume_inputs(location, manifest, *, features, space):
    """(the stored space, the features): ``space`` compared with the stored one, ``features`` rebuilt or
    checked against the manifest's key."""
    stored_space = _load_space_checked(manifest["space"], None)
    if space is not None:
        given = _load_space_checked(space, None)
        differences = space_differences(manifest["space"], given.to_dict())
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
    return stored_space, features


def _use_this_place(tuner, search_space, manifest, location, journal) -> None:
    """Point the restored Tuner's searcher, scheduler and snapshot callback at this experiment folder and
    journal (Tune's pickles name the folder where the sweep started: a moved or copied experiment would
    otherwise read and write the original). Through Ray Client this cannot be done: a moved experiment is
    refused there."""
    tune_config, run_config = _tuner_configs(search_space, manifest, location, journal)
    snapshot = next(cb for cb in run_config.callbacks if isinstance(cb, SnapshotCallback))
    if use_current_objects(tuner, tune_config, snapshot):
        return
    started_at = os.path.join(manifest.get("storage", location.storage), manifest["name"])
    if started_at != location.path:
        raise ExperimentError(
            f"Cannot resume {location.path} through Ray Client: it was started at {started_at}, and Tune's "
            "files name that place. Resume it from a driver on the cluster (address='auto'), or from its "
            "original place.")


def _start_ray_checked(location, address, connect_timeout_s, options, search_space) -> bool:
    """init_ray + check_resources; on a refusal the experiment folder search() just made is removed again,
    so the same name can be used once the cause is fixed."""
    started = False
    try:
        started = init_ray(address, connect_timeout_s=connect_timeout_s)
        check_resources(options["resources_per_trial"], devices=[search_space.fixed.get("device", "auto")])
    except ExperimentError:
        shutdown_ray(started)
        location.remove_dir("")
        raise
    return started


# -- inputs --------------------------------------------------------------------------------------------


def _load_space_checked(space, features, *, select: str | None = None):
    """The validated space; ``select`` (search's argument) replaces the space's rule when given."""
    from .space import SearchSpace, load_space

    if isinstance(space, SearchSpace):
        space = space.to_dict()
    search_space = load_space(space, features=features)
    if select is None:
        return search_space
    from .confidence import check_rule

    return dataclasses.replace(search_space, select=check_rule(select))


def _check_search_options(*, num_samples, max_concurrent, resources_per_trial, scheduler, sampler, repeats,
                          seed, name, checkpoint_every=None) -> dict[str, Any]:
    """The options as given, numpy scalars made Python ones (for the manifest's JSON); ConfigError listing
    every problem otherwise."""
    problems = [int_problem("num_samples", num_samples, minimum=1),
                None if max_concurrent is None else int_problem("max_concurrent", max_concurrent, minimum=1),
                int_problem("repeats", repeats, minimum=1),
                None if checkpoint_every is None else int_problem("checkpoint_every", checkpoint_every, minimum=1),
                int_problem("seed", seed, minimum=0)]
    problems = [problem for problem in problems if problem is not None]
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
                if not is_number(value) or not value >= 0:
                    problems.append(f"resources_per_trial[{key!r}] must be a number >= 0, but got {value!r}.")
            if all(is_number(v) and v == 0 for v in resources_per_trial.values()):
                problems.append(f"resources_per_trial must ask for some resource (e.g. cpu: 1 or cpu: 0.5), but "
                                f"got {resources_per_trial!r}: a trial needs a CPU or a GPU to run on.")
    if problems:
        raise ConfigError(problems, where="search options")
    if resources_per_trial is not None:
        resources_per_trial = {k: v.item() if hasattr(v, "item") else v for k, v in resources_per_trial.items()}
    return {"num_samples": int(num_samples), "max_concurrent": None if max_concurrent is None else int(max_concurrent),
            "resources_per_trial": resources_per_trial, "scheduler": scheduler, "sampler": sampler,
            "repeats": int(repeats), "seed": int(seed), "name": name,
            "checkpoint_every": None if checkpoint_every is None else int(checkpoint_every)}


def _check_tune_options(*, callbacks, time_budget_s, stop) -> None:
    from .ecosystem import callback_problems, stop_problems

    problems = callback_problems(callbacks) + stop_problems(time_budget_s=time_budget_s, stop=stop)
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


def _rebuild_features(manifest, location):
    build_args = manifest.get("feature_build_args")
    if not build_args:
        raise ExperimentError(
            f"Cannot rebuild the features of {location.path}: its manifest has no build arguments (they were "
            "not made by build_features). Pass features= to resume.")
    from .features import rebuild_features

    log("rebuilding features from the manifest's build arguments")
    return rebuild_features(build_args)



# -- Ray Tune ------------------------------------------------------------------------------------------


def _trainable(features, search_space, manifest, location):
    import ray
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
    # Put once: Tune hands every trial the dict, its arrays read-only zero-copy views of shared memory.
    trainable = tune.with_parameters(run_trial, features=ray.put(features.to_dict()), settings=settings)
    return tune.with_resources(trainable, resources)


def _tuner_configs(search_space, manifest, location, journal: Path, *, callbacks=None, time_budget_s=None,
                   stop=None):
    """(TuneConfig, RunConfig): OptunaSearch + ASHA (or none), loggers and callbacks, retries, snapshots."""
    import logging

    import optuna
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from .ecosystem import tune_callbacks
    from .progress import debug, logger

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
        storage=journal_storage(journal),
        steps=manifest["steps"],
        location=location,
    )
    search_alg = searcher
    if manifest["max_concurrent"]:
        search_alg = ConcurrencyLimiter(searcher, max_concurrent=manifest["max_concurrent"])
    search_alg = StudySearchGenerator(search_alg)
    scheduler = None
    if manifest["scheduler"] == "asha":
        scheduler = _asha(metric=metrics[0], steps=manifest["steps"], eval_every=manifest["eval_every"])
    tune_config = tune.TuneConfig(search_alg=search_alg, scheduler=scheduler,
                                  num_samples=manifest["num_samples"], reuse_actors=True, time_budget_s=time_budget_s)
    loggers = tune_callbacks(callbacks, name=manifest["name"])
    debug("Tune callbacks: " + ", ".join(type(c).__name__ for c in loggers))
    run_config = tune.RunConfig(
        name=location.name,
        storage_path=location.storage,
        failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None),  # keep all: see the module docstring
        stop=stop,
        callbacks=[
            *loggers,
            SnapshotCallback(location, journal, scheduler, searcher),
            ProgressCallback(num_samples=manifest["num_samples"], steps=manifest["steps"], metric=metrics[0]),
        ],
        verbose=1 if logger.isEnabledFor(logging.DEBUG) else 0,  # Tune's own tables at DEBUG (--verbose)
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


def _fit(tuner, location, journal: Path) -> None:
    """Run the Tuner; the final snapshot (scheduler state, journal copy) is written at the end."""
    quiet_snapshot_warning()  # checkpoints force frequent snapshots, and Tune warns at each: noise here
    started = time.perf_counter()
    try:
        tuner.fit()
    finally:
        if location.is_uri and journal.exists():
            location.write_bytes(JOURNAL_FILE, journal.read_bytes())
    log(f"done in {time.perf_counter() - started:.1f} s: {location.path}")


def _load_run(location, *, verdict: bool = False):
    """The experiment as a Run; ``verdict``: log the selected trial against the best baseline (end of a sweep)."""
    from .faults import raise_if_every_trial_failed
    from .results import load_run

    run = load_run(location.local_path or location.path)
    raise_if_every_trial_failed(run)
    if verdict:
        for line in run.verdicts().values():
            log(f"verdict: {line}")
    return run
