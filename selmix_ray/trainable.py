"""The Ray Tune trainable: one trial = one ``finetune`` run on the shared features (docs/architecture.md, Modules).

A thin adapter, nothing more::

    Tune config dict -> SearchSpace.trial_config -> FinetuneConfig -> finetune / finetune_repeats
    engine report(metrics) + checkpoint(state) -> one ray.tune.report(metrics, checkpoint=...)

The features arrive through ``tune.with_parameters`` as the dict that ``sweep`` put (``features.to_dict()``)
in the object store: numpy arrays that are read-only, zero-copy views of shared memory.

Every engine report becomes one ``tune.report``; some of them also carry a checkpoint with the resumable
``FinetuneState`` and the whole history so far: step 0, every ``checkpoint_every``-th report, the steps in
``checkpoint_steps`` (the scheduler's rungs, where a trial may be stopped, so a stopped trial's last report
is checkpointed) and the last step. A retried trial (worker crash, node loss) restarts from its last
checkpoint and replays the reports after it; the engine is deterministic, so the replayed values equal the
first ones. Checkpoint layout: ``finetune_state.pt`` + ``history.json`` (one History); with ``repeats = r
> 1``, ``finetune_state_<i>.pt`` for each copy i and ``history.json`` holding a JSON list of the r
histories. The history is stored once, in ``history.json`` (the state files hold an empty one, filled in
from ``history.json`` on load), so a checkpoint costs one history, not two.

Ray is imported lazily (inside the functions), so importing this module starts nothing.

Test-only fault hook: ``settings["fault_at_step"] = N`` makes a trial raise once, right after its first
checkpoint at a step >= N, so the retry path can be tested. ``search`` fills it from the environment variables
``SELMIX_RAY_TEST_FAULT_AT_STEP`` and ``SELMIX_RAY_TEST_FAULT_MAX_TRIALS`` (default: every trial) of the
*driver* (workers of an already running cluster do not see the driver's environment). Marker files in
a folder the driver names make it fire once per trial, in at most that many trials. Never set them
outside tests.

Test-only fetch log: ``SELMIX_RAY_TEST_FETCH_LOG=FILE`` (read on the driver, like the fault hook) makes
every trial start append one JSON line to FILE: its node id, trial id, process id and the memory mapping
(``device:inode`` from ``/proc/self/maps``) that holds its largest feature array, ``"private"`` when that
array is a copy in the process's own memory. The multi-node test counts the copies per node with it.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checks import is_int
from .constants import HISTORY_FILE, STATE_FILE
from .errors import ConfigError

__all__ = ["run_trial", "trial_settings", "FAULT_ENV", "FAULT_LIMIT_ENV", "TrialFault"]

FAULT_ENV = "SELMIX_RAY_TEST_FAULT_AT_STEP"  # test-only: the step after whose checkpoint a trial raises once
FAULT_LIMIT_ENV = "SELMIX_RAY_TEST_FAULT_MAX_TRIALS"  # test-only: at most this many trials raise
FETCH_LOG_ENV = "SELMIX_RAY_TEST_FETCH_LOG"  # test-only: file where each trial start logs where its features are
_FAULT_MARKERS = ".selmix_test_faults"  # folder of marker files (one per trial that raised)


class TrialFault(RuntimeError):
    """Raised on purpose by the test-only fault hook (never in normal use)."""


def trial_settings(space: dict[str, Any], *, repeats: int, seed: int, checkpoint_every: int = 1,
                   checkpoint_steps: Sequence[int] = (), fault_dir: str | None = None) -> dict[str, Any]:
    """What every trial of a sweep shares besides the features (small; pickled into the trainable).

    ``space`` is ``SearchSpace.to_dict()``. ``checkpoint_every``: a checkpoint every this many reports
    (1: every report); ``checkpoint_steps``: steps that are always checkpointed (the scheduler's rungs);
    step 0 and the last step always are. The test-only fault hook is read here, on the driver;
    ``fault_dir`` is where its marker files go (a folder every worker of a one-machine test can reach).
    """
    if not is_int(checkpoint_every) or checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every must be an integer >= 1 (reports between checkpoints), but got "
                          f"{checkpoint_every=!r}.")
    fault, limit = os.environ.get(FAULT_ENV), os.environ.get(FAULT_LIMIT_ENV)
    return {
        "space": space,
        "repeats": int(repeats),
        "seed": int(seed),
        "checkpoint_every": int(checkpoint_every),
        "checkpoint_steps": sorted({int(step) for step in checkpoint_steps}),
        "fault_at_step": int(fault) if fault else None,
        "fault_max_trials": int(limit) if limit else None,
        "fault_dir": fault_dir,
        "fetch_log": os.environ.get(FETCH_LOG_ENV) or None,
    }


def run_trial(config: dict[str, Any], *, features: dict[str, Any], settings: dict[str, Any]) -> None:
    """Ray Tune function trainable: fine-tune one configuration and report at every engine report.

    Args:
        config: the trial's sampled values (Tune's config dict).
        features: the FeatureSet dict from the object store (``tune.with_parameters``).
        settings: :func:`trial_settings` output.
    """
    from ray import tune

    from .config import FinetuneConfig
    from .featureset import FeatureSet
    from .space import load_space

    if settings.get("fetch_log"):
        _log_fetch(settings["fetch_log"], features)
    feature_set = FeatureSet.from_object_store(features)
    space = load_space(settings["space"])
    values = space.trial_config(config)
    values.setdefault("seed", settings["seed"])
    if values.get("device", "auto") == "auto":
        values["device"] = _trial_device()
    finetune_config = FinetuneConfig.from_dict(values)
    repeats = settings["repeats"]

    state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = _load_state(Path(folder), repeats=repeats)

    reporter = _Reporter(
        checkpoint_at=_CheckpointSchedule(steps=finetune_config.steps, eval_every=finetune_config.eval_every,
                                          every=settings.get("checkpoint_every", 1),
                                          extra=settings.get("checkpoint_steps", ())),
        fault_at_step=settings.get("fault_at_step"), fault_max_trials=settings.get("fault_max_trials"),
        fault_dir=settings.get("fault_dir"))
    if repeats == 1:
        from .engine import finetune

        finetune(feature_set, finetune_config, report=reporter.report, checkpoint=reporter.checkpoint,
                 state=state)
    else:
        from .engine import finetune_repeats

        finetune_repeats(feature_set, finetune_config, repeats=repeats, report=reporter.report,
                         checkpoint=reporter.checkpoint, state=state)
    reporter.flush()


def _log_fetch(path: str, payload: dict[str, Any]) -> None:
    """Test-only (FETCH_LOG_ENV): one JSON line saying which node this trial runs on and which memory
    mapping holds its largest feature array (the node's shared object store, or "private")."""
    import json

    import ray
    from ray import tune

    arrays, todo = [], [payload]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            todo.extend(item.values())
        elif hasattr(item, "__array_interface__"):
            arrays.append(item)
    address = max(arrays, key=lambda a: a.nbytes).__array_interface__["data"][0]
    mapping = "private"
    with open("/proc/self/maps", encoding="utf-8") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(part, 16) for part in fields[0].split("-"))
            if low <= address < high and fields[4] != "0":  # inode 0: anonymous memory, a private copy
                mapping = f"{fields[3]}:{fields[4]}"
    record = {"node": ray.get_runtime_context().get_node_id(), "trial": tune.get_context().get_trial_id(),
              "pid": os.getpid(), "mapping": mapping}
    with open(path, "a", encoding="utf-8") as log_file:
        log_file.write(json.dumps(record) + "\n")


def _trial_device() -> str:
    """'cuda' when Ray gave this trial a GPU (fractional included) and CUDA works here, else 'cpu'."""
    import ray

    if ray.get_gpu_ids():
        import torch

        if torch.cuda.is_available():
            return "cuda"
    return "cpu"


def _state_files(folder: Path, repeats: int) -> list[Path]:
    """STATE_FILE for one copy; finetune_state_<r>.pt for copy r of ``repeats`` > 1."""
    if repeats == 1:
        return [folder / STATE_FILE]
    stem, suffix = os.path.splitext(STATE_FILE)
    return [folder / f"{stem}_{r}{suffix}" for r in range(repeats)]


def _load_state(folder: Path, *, repeats: int):
    """The FinetuneState (repeats = 1) or the list of per-copy states a checkpoint holds.

    The histories come from ``history.json``; a state file's own history is used only when it is not
    empty (checkpoints written before the history was stored once).
    """
    import json

    from .engine import FinetuneState
    from .history import History

    states = [FinetuneState.load(path) for path in _state_files(folder, repeats)]
    stored = json.loads((folder / HISTORY_FILE).read_text(encoding="utf-8"))
    stored = [stored] if repeats == 1 else stored
    for state, history in zip(states, stored):
        if not state.history.records:
            state.history = History.from_dict(history)
    return states[0] if repeats == 1 else states


class _CheckpointSchedule:
    """Which reported steps carry a checkpoint: 0, every ``every``-th report, ``extra`` and ``steps``."""

    def __init__(self, *, steps: int, eval_every: int, every: int = 1, extra: Sequence[int] = ()):
        self.steps, self.eval_every, self.every = steps, eval_every, every
        self.extra = frozenset(int(step) for step in extra)

    def __call__(self, step: int) -> bool:
        return (step == 0 or step >= self.steps or step in self.extra
                or (step // self.eval_every) % self.every == 0)


class _Reporter:
    """Pairs each engine report with the checkpoint that follows it into one ``tune.report``."""

    def __init__(self, *, checkpoint_at=None, fault_at_step: int | None = None,
                 fault_max_trials: int | None = None, fault_dir: str | None = None):
        self.pending: dict[str, float] | None = None
        self.checkpoint_at = checkpoint_at or (lambda step: True)
        self.fault_at_step = fault_at_step
        self.fault_max_trials = fault_max_trials
        self.fault_dir = fault_dir

    def report(self, metrics: dict[str, float]) -> None:
        self.flush()  # a report the engine did not checkpoint still reaches Tune
        self.pending = {key: float(value) for key, value in metrics.items()}

    def checkpoint(self, state) -> None:
        from ray import tune

        from .history import History

        metrics, self.pending = self.pending or {}, None
        states = state if isinstance(state, list) else [state]
        if not self.checkpoint_at(states[0].step):
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="selmix_ckpt_") as folder:
            for copy_state, path in zip(states, _state_files(Path(folder), len(states))):
                dataclasses.replace(copy_state, history=History()).save(path)  # the history goes once, below
            (Path(folder) / HISTORY_FILE).write_text(_history_json(states), encoding="utf-8")
            # tune.report persists (copies) the checkpoint before it returns: the folder can go.
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        self._maybe_fault(states[0].step)

    def flush(self) -> None:
        if self.pending is not None:
            from ray import tune

            metrics, self.pending = self.pending, None
            tune.report(metrics)

    def _maybe_fault(self, step: int) -> None:
        """Test-only: raise once per trial right after its first checkpoint at a step >= ``fault_at_step``."""
        if self.fault_at_step is None or step < self.fault_at_step:
            return
        from ray import tune

        context = tune.get_context()
        markers = Path(self.fault_dir or tempfile.gettempdir()) / _FAULT_MARKERS
        marker = markers / context.get_trial_id()
        if marker.exists():
            return
        markers.mkdir(parents=True, exist_ok=True)
        if self.fault_max_trials is not None and not _claim_fault_slot(markers, self.fault_max_trials):
            return
        marker.write_text("raised\n", encoding="utf-8")
        raise TrialFault(f"test-only fault injected after step {self.fault_at_step} ({FAULT_ENV}).")


def _claim_fault_slot(markers: Path, limit: int) -> bool:
    """Atomically take one of ``limit`` slots (O_EXCL files), so concurrent trials cannot both take the last."""
    for slot in range(limit):
        try:
            os.close(os.open(markers / f"slot_{slot}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            continue
    return False


def _history_json(states: list) -> str:
    """The whole history so far as JSON: one History, or a JSON list of one per copy for repeats > 1."""
    if len(states) == 1:
        return states[0].history.to_json()
    import json

    return json.dumps([s.history.to_dict() for s in states])
