"""The Ray Tune trainable: one trial = one ``finetune`` run on the shared features (SPEC.md section 8).

A thin adapter, nothing more::

    Tune config dict -> SearchSpace.trial_config -> FinetuneConfig -> finetune / finetune_repeats
    engine report(metrics) + checkpoint(state) -> one ray.tune.report(metrics, checkpoint=...)

The features arrive through ``tune.with_parameters`` as the dict that ``FeatureSet.to_object_store`` put
in the object store: numpy arrays that are read-only, zero-copy views of shared memory. Every report
carries a checkpoint directory with the resumable ``FinetuneState`` and the whole history so far, so a
retried trial (worker crash, node loss) restarts from its last report, not from step 0. Checkpoint layout:
``finetune_state.pt`` + ``history.json`` (one History); with ``repeats = r > 1``, ``finetune_state_<i>.pt``
for each copy i and ``history.json`` holding a JSON list of the r histories.

Ray is imported lazily (inside the functions), so importing this module starts nothing.

Test-only fault hook: ``settings["fault_at_step"] = N`` makes a trial raise once, right after it has
checkpointed step N, so the retry path can be tested. ``search`` fills it from the environment variables
``SELMIX_RAY_TEST_FAULT_AT_STEP`` and ``SELMIX_RAY_TEST_FAULT_MAX_TRIALS`` (default: every trial) of the
*driver* (workers of an already running cluster do not see the driver's environment). Marker files in
a folder the driver names make it fire once per trial, in at most that many trials. Never set them
outside tests.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from .constants import HISTORY_FILE, STATE_FILE, STEP_KEY

__all__ = ["run_trial", "trial_settings", "FAULT_ENV", "FAULT_LIMIT_ENV", "TrialFault"]

FAULT_ENV = "SELMIX_RAY_TEST_FAULT_AT_STEP"  # test-only: the step after whose checkpoint a trial raises once
FAULT_LIMIT_ENV = "SELMIX_RAY_TEST_FAULT_MAX_TRIALS"  # test-only: at most this many trials raise
_FAULT_MARKERS = ".selmix_test_faults"  # folder of marker files (one per trial that raised)


class TrialFault(RuntimeError):
    """Raised on purpose by the test-only fault hook (never in normal use)."""


def trial_settings(space: dict[str, Any], *, repeats: int, seed: int, fault_dir: str | None = None
                   ) -> dict[str, Any]:
    """What every trial of a sweep shares besides the features (small; pickled into the trainable).

    ``space`` is ``SearchSpace.to_dict()``. The test-only fault hook is read here, on the driver;
    ``fault_dir`` is where its marker files go (a folder every worker of a one-machine test can reach).
    """
    fault, limit = os.environ.get(FAULT_ENV), os.environ.get(FAULT_LIMIT_ENV)
    return {
        "space": space,
        "repeats": int(repeats),
        "seed": int(seed),
        "fault_at_step": int(fault) if fault else None,
        "fault_max_trials": int(limit) if limit else None,
        "fault_dir": fault_dir,
    }


def run_trial(config: dict[str, Any], *, features: dict[str, Any], settings: dict[str, Any]) -> None:
    """Ray Tune function trainable: fine-tune one configuration and report at every engine report.

    Args:
        config: the trial's sampled values (Tune's config dict).
        features: the FeatureSet dict from the object store (``tune.with_parameters``).
        settings: :func:`trial_settings` output.
    """
    from ray import tune

    from .featureset import FeatureSet
    from .finetune import FinetuneConfig
    from .space import load_space

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

    reporter = _Reporter(fault_at_step=settings.get("fault_at_step"),
                         fault_max_trials=settings.get("fault_max_trials"), fault_dir=settings.get("fault_dir"))
    if repeats == 1:
        from .finetune import finetune

        finetune(feature_set, finetune_config, report=reporter.report, checkpoint=reporter.checkpoint,
                 state=state)
    else:
        from .finetune import finetune_repeats

        finetune_repeats(feature_set, finetune_config, repeats=repeats, report=reporter.report,
                         checkpoint=reporter.checkpoint, state=state)
    reporter.flush()


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
    """The FinetuneState (repeats = 1) or the list of per-copy states a checkpoint holds."""
    from .finetune import FinetuneState

    states = [FinetuneState.load(path) for path in _state_files(folder, repeats)]
    return states[0] if repeats == 1 else states


class _Reporter:
    """Pairs each engine report with the checkpoint that follows it into one ``tune.report``."""

    def __init__(self, *, fault_at_step: int | None = None, fault_max_trials: int | None = None,
                 fault_dir: str | None = None):
        self.pending: dict[str, float] | None = None
        self.fault_at_step = fault_at_step
        self.fault_max_trials = fault_max_trials
        self.fault_dir = fault_dir

    def report(self, metrics: dict[str, float]) -> None:
        self.flush()  # a report the engine did not checkpoint still reaches Tune
        self.pending = {key: float(value) for key, value in metrics.items()}

    def checkpoint(self, state) -> None:
        from ray import tune

        metrics, self.pending = self.pending or {}, None
        with tempfile.TemporaryDirectory(prefix="selmix_ckpt_") as folder:
            states = state if isinstance(state, list) else [state]
            for copy_state, path in zip(states, _state_files(Path(folder), len(states))):
                copy_state.save(path)
            (Path(folder) / HISTORY_FILE).write_text(_history_json(states), encoding="utf-8")
            # tune.report persists (copies) the checkpoint before it returns: the folder can go.
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        self._maybe_fault(metrics)

    def flush(self) -> None:
        if self.pending is not None:
            from ray import tune

            metrics, self.pending = self.pending, None
            tune.report(metrics)

    def _maybe_fault(self, metrics: dict[str, float]) -> None:
        """Test-only: raise once per trial right after step ``fault_at_step`` was checkpointed."""
        if self.fault_at_step is None or metrics.get(STEP_KEY) != self.fault_at_step:
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

    return json.dumps([json.loads(s.history.to_json()) for s in states])
