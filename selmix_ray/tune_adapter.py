"""Every use of Ray Tune's and Optuna's private internals, in one place (written for Ray 2.60, Optuna 5.1).

What selmix-ray relies on beyond their public APIs, and the function or class that does it:

- ``OptunaSearch``'s private ``_ot_study``, ``_ot_trials`` (Tune trial id -> Optuna trial) and
  ``_completed_trials``, and its ``save``/``restore`` pickling ``__dict__`` (:class:`StudySearch`);
- Optuna's ``NSGAIISampler`` holding an unpicklable ``threading.Lock`` as ``_thread_lock``
  (:class:`PicklableNSGAIISampler`);
- ASHA's ``_brackets`` (each with ``_rungs``: a list of (milestone, {trial id: value})), ``_trial_info``
  (trial id -> bracket), ``_num_stopped`` and ``_counter`` (:func:`scheduler_state`);
- Tune calling every callback's ``get_state`` when it writes an experiment snapshot, and never restoring
  a scheduler's state on ``Tuner.restore`` (:class:`SnapshotCallback`);
- ``Tuner._local_tuner._tune_config`` / ``._run_config`` holding the searcher, scheduler and callbacks
  that ``Tuner.restore`` unpickled from ``tuner.pkl`` (:func:`use_current_objects`), and ``OptunaSearch``
  keeping its journal storage as ``_storage`` (:class:`StudySearch`'s ``restore``);
- the text of the warning that ``ray.tune.execution.experiment_state`` logs at frequent snapshots
  (:func:`quiet_snapshot_warning`);
- the layout of Tune's ``experiment_state-<time>.json`` files and of Optuna's journal lines, read without
  Ray or Optuna in ``tune_files`` (re-exported here: :func:`parse_experiment_state`,
  :func:`read_trial_states`, :func:`listed_trial_ids`, :func:`snapshot_checkpoints`,
  :func:`damaged_snapshot_files`, :func:`read_journal_trial_links`);
- Tune calling the searcher's ``save`` when it writes a snapshot to the driver's staging folder, before
  it uploads that snapshot's files to storage one by one; ``SearchGenerator``'s ``_counter`` and
  ``ConcurrencyLimiter``'s ``live_trials`` (:class:`StudySearch`, :class:`StudySearchGenerator`).

``tests/test_tune_adapter.py`` checks each of these on the installed versions and that those are within
:data:`TESTED_VERSIONS`; when one fails it names the function here to revisit.

Importing this module imports neither Ray nor Optuna (``results`` reads experiment states with Ray
stopped): the four classes that subclass Ray's and Optuna's are defined on first access (module
``__getattr__``), which imports them then; the methods of two of them live in mixins here
(``_StudySearchMethods``, ``_GeneratorMethods``). Pickles name them ``selmix_ray.tune_adapter.<Class>``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import tempfile
import threading
from importlib import metadata
from pathlib import Path

from .constants import JOURNAL_FILE, LEGACY_SCHEDULER_STATE_FILE, SCHEDULER_STATE_FILE, STEP_KEY
from .tune_files import (  # re-exported: the files' readers live there, without Ray or Optuna
    EXPERIMENT_STATE_PREFIX,
    TUNE_TRIAL_ID_ATTR,
    TuneTrialState,
    damaged_snapshot_files,
    experiment_state_files,
    journal_op_codes,
    listed_trial_ids,
    parse_experiment_state,
    read_journal_trial_links,
    read_trial_states,
    snapshot_checkpoints,
)

__all__ = [
    "TESTED_VERSIONS",
    "untested_versions",
    "StudySearch",
    "StudySearchGenerator",
    "PicklableNSGAIISampler",
    "SnapshotCallback",
    "quiet_snapshot_warning",
    "TuneTrialState",
    "EXPERIMENT_STATE_PREFIX",
    "experiment_state_files",
    "parse_experiment_state",
    "read_trial_states",
    "listed_trial_ids",
    "snapshot_checkpoints",
    "damaged_snapshot_files",
    "TUNE_TRIAL_ID_ATTR",
    "read_journal_trial_links",
    "journal_op_codes",
    "use_current_objects",
    "scheduler_state",
    "restore_scheduler_state",
]

# package -> (lowest tested, first untested) release: [low, high). Widen only after the adapter tests pass.
TESTED_VERSIONS = {"ray": ((2, 60), (2, 61)), "optuna": ((5, 1), (5, 2))}
SNAPSHOT_WARNING = "snapshotting has been triggered multiple times"  # part of Tune's warning text
SNAPSHOT_LOGGER = "ray.tune.execution.experiment_state"  # the module that logs it
_LAZY_CLASSES = ("StudySearch", "StudySearchGenerator", "PicklableNSGAIISampler", "SnapshotCallback")


def untested_versions() -> list[str]:
    """One sentence per installed package outside :data:`TESTED_VERSIONS` (empty: all tested)."""
    out = []
    for package, (low, high) in TESTED_VERSIONS.items():
        installed = metadata.version(package)
        release = tuple(int(re.match(r"\d*", part).group() or 0) for part in installed.split(".")[:2])
        if not low <= release < high:
            out.append(f"{package} {installed} is outside the tested range [{'.'.join(map(str, low))}, "
                       f"{'.'.join(map(str, high))}) of selmix_ray.tune_adapter.")
    return out


# -- Tune's experiment state (no Ray needed) ---------------------------------------------------------


# -- logging -------------------------------------------------------------------------------------------


class _DropSnapshotWarning:
    """logging filter: drops Tune's 'snapshotting has been triggered multiple times' warning only."""

    def filter(self, record) -> bool:
        return SNAPSHOT_WARNING not in record.getMessage()


def quiet_snapshot_warning() -> None:
    """Silence the warning Tune logs each time checkpoints force an experiment snapshot (noise here:
    trials checkpoint often by design); idempotent."""
    state_logger = logging.getLogger(SNAPSHOT_LOGGER)
    if not any(isinstance(f, _DropSnapshotWarning) for f in state_logger.filters):
        state_logger.addFilter(_DropSnapshotWarning())


# -- Optuna and Tune subclasses (defined on first access) ---------------------------------------------


def tell(study, trial, **kwargs) -> bool:
    """``study.tell`` that tolerates a trial already finished (a restored trial may be told twice)."""
    try:
        study.tell(trial, **kwargs)
        return True
    except (ValueError, RuntimeError):
        return False


def __getattr__(name: str):
    if name in _LAZY_CLASSES:
        _define_sampler()
        _define_searcher()
        _define_callback()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _define_sampler() -> None:
    global PicklableNSGAIISampler
    from optuna.samplers import NSGAIISampler

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


_LOCK_TYPE = type(threading.Lock())


class _StudySearchMethods:
    """OptunaSearch that tells PRUNED trials, tolerates re-told trials and fails orphans on restore;
    each Optuna trial carries its Tune trial id as the user attribute :data:`TUNE_TRIAL_ID_ATTR`.

    Args (besides OptunaSearch's): steps, the sweep's step count: a trial that ends before it was
    stopped by the scheduler and is told PRUNED (no value; telling PRUNED with a value raises in Optuna);
    location, the experiment's :class:`selmix_ray.storage.Location` (where Tune's snapshots land).

    The study never holds a finished trial that the experiment snapshot *on storage* does not list.
    Tune writes a snapshot to the driver's staging folder (calling ``save`` then) and uploads it
    afterwards, asynchronously; a driver killed before the upload lands leaves an older snapshot on
    storage, and ``Tuner.restore`` forgets every trial that only the lost one listed. So a finished trial
    is told to Optuna only once the newest snapshot on storage lists it: at once when the last look at
    storage (``tell_listed``, at every ``save`` and at the experiment's end) already saw it, otherwise at
    the first later look that does. On ``restore`` the storage snapshot decides: held outcomes of trials
    it lists are told, Optuna trials it does not list are marked FAIL (a finished trial can no longer be
    changed, and the study would end with more COMPLETE + PRUNED trials than the experiment has), and the
    searcher forgets them (:meth:`reconcile`).
    """

    def __init__(self, *, steps: int, location=None, **kwargs):
        super().__init__(**kwargs)
        self._steps = steps
        self._location = location
        self._on_storage: set[str] = set()  # trial ids the snapshot on storage listed at the last look
        self._untold: dict[str, dict] = {}  # trial id -> tell kwargs, held until storage lists the trial
        self._restored_listing: set[str] | None = None

    def suggest(self, trial_id: str):
        asked_before = trial_id in self._ot_trials
        config = super().suggest(trial_id)
        if not asked_before and trial_id in self._ot_trials:  # the link Run.df and the study share
            self._ot_trials[trial_id].set_user_attr(TUNE_TRIAL_ID_ATTR, trial_id)
        return config

    def storage_listing(self) -> set[str] | None:
        """Trial ids the newest experiment snapshot on storage lists; None when none can be read."""
        if self._location is None:
            return None
        try:
            return listed_trial_ids(self._location.listdir(), self._location.read_bytes)
        except OSError:
            return None

    def tell_listed(self) -> None:
        """Tell Optuna the held outcomes of trials that the snapshot on storage now lists (storage is read
        only while an outcome is held: a snapshot of a large sweep is megabytes)."""
        if not self._untold:
            return
        listed = self.storage_listing()
        if listed is None:
            return
        self._on_storage = listed
        for trial_id in [t for t in self._untold if t in listed]:
            tell(self._ot_study, self._ot_trials[trial_id], **self._untold.pop(trial_id))

    def save(self, checkpoint_path: str) -> None:
        self.tell_listed()  # Tune wrote this snapshot to staging only: storage has the previous one
        state = {k: v for k, v in self.__dict__.items() if k != "_location"}  # the place: this run's
        with open(checkpoint_path, "wb") as file:
            pickle.dump(state, file)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, list) or trial_id in self._completed_trials:
            return
        try:  # intermediate values for optuna-dashboard, indexed by step
            self._ot_trials[trial_id].report(float(result[self.metric]), int(result[STEP_KEY]))
        except (RuntimeError, ValueError, KeyError):
            pass  # e.g. a restored trial that Optuna already saw finish

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        from optuna.trial import TrialState

        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
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
        if trial_id in self._on_storage:
            tell(self._ot_study, ot_trial, **outcome)
        else:
            self._untold[trial_id] = outcome
        self._completed_trials.add(trial_id)

    def restore(self, checkpoint_path: str) -> None:
        study, storage, location = (getattr(self, "_ot_study", None), getattr(self, "_storage", None),
                                    getattr(self, "_location", None))
        super().restore(checkpoint_path)
        _keep_current_study(self, study, storage)
        self._location = location
        self.__dict__.setdefault("_untold", {})  # a state saved before these attributes existed
        self.__dict__.pop("_in_snapshot", None)
        self._restored_listing = self.storage_listing()
        self.reconcile(self._restored_listing)

    def reconcile(self, listed: set[str] | None) -> None:
        """Make the searcher and the study agree with the trials Tune restores (``listed``: the trial ids
        of the snapshot it restores from; None: unknown, then the searcher's own state is trusted).

        Held outcomes of listed trials are told; trials not listed are forgotten (a killed driver started
        them after its last snapshot reached storage; Tune never continues them); every RUNNING Optuna
        trial that no listed trial owns is marked FAIL; a listed trial the saved searcher did not know
        yet (its state older than the snapshot) is linked again through its user attribute.
        """
        if listed is not None:
            for trial_id in [t for t in self._ot_trials if t not in listed]:
                del self._ot_trials[trial_id]
                self._completed_trials.discard(trial_id)
            self._relink(listed - set(self._ot_trials))
        for trial_id, outcome in self._untold.items():
            if trial_id in self._ot_trials:
                tell(self._ot_study, self._ot_trials[trial_id], **outcome)
        self._untold = {}
        self._on_storage = set(self._ot_trials) if listed is None else set(listed)
        from optuna.trial import TrialState

        owned = {ot_trial.number for ot_trial in self._ot_trials.values()}
        for trial in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.number not in owned:  # asked after the last snapshot on storage: Tune never recorded it
                tell(self._ot_study, trial.number, state=TrialState.FAIL)

    def _relink(self, trial_ids: set[str]) -> None:
        if not trial_ids:
            return
        import optuna

        for trial in self._ot_study.get_trials(deepcopy=False):
            trial_id = trial.user_attrs.get(TUNE_TRIAL_ID_ATTR)
            if trial_id in trial_ids:
                self._ot_trials[trial_id] = optuna.Trial(self._ot_study, trial._trial_id)
                if trial.state.is_finished():
                    self._completed_trials.add(trial_id)


class _GeneratorMethods:
    """Tune's SearchGenerator whose restored trial counter and concurrency slots follow the trials Tune
    restores (the snapshot on storage), not the saved searcher state.

    Tune uploads a snapshot's files one by one; a driver killed during the upload can leave a newer
    searcher state beside an older trial list, whose counter then already counts the trials Tune
    forgot: the resumed sweep would end short of ``num_samples``, or wait for concurrency slots held by
    trials that never finish. After Tune's restore, the counter is the number of trials restored and the
    :class:`~ray.tune.search.ConcurrencyLimiter` keeps only restored trials as live.
    """

    def restore_from_dir(self, dirpath: str) -> None:
        from ray.tune.search import ConcurrencyLimiter

        super().restore_from_dir(dirpath)
        searcher, limiter = self.searcher, None
        while hasattr(searcher, "searcher"):
            limiter = searcher if isinstance(searcher, ConcurrencyLimiter) else limiter
            searcher = searcher.searcher
        listed = getattr(searcher, "_restored_listing", None)
        if listed is None:
            return
        self._counter = len(listed)
        if limiter is not None:
            limiter.live_trials = {t for t in limiter.live_trials if t in listed}
            limiter.num_unfinished_live_trials = len(limiter.live_trials)


def _define_searcher() -> None:
    global StudySearch, StudySearchGenerator
    from ray.tune.search import SearchGenerator
    from ray.tune.search.optuna import OptunaSearch

    class StudySearch(_StudySearchMethods, OptunaSearch):
        __doc__ = _StudySearchMethods.__doc__

    class StudySearchGenerator(_GeneratorMethods, SearchGenerator):
        __doc__ = _GeneratorMethods.__doc__


def _keep_current_study(searcher, study, storage) -> None:
    """After OptunaSearch's ``restore``: use ``study`` (on ``storage``), the one the searcher was built with.

    The saved state names the journal by its absolute path at save time: an experiment moved or copied
    since would read and write the old place (another experiment). The restored sampler and trial links
    are kept, the trials re-linked to ``study`` (same trial ids: the journal is the same one, moved).
    """
    if study is None:
        return
    import optuna

    study.sampler = searcher._sampler
    searcher._ot_trials = {tid: optuna.Trial(study, trial._trial_id) for tid, trial in searcher._ot_trials.items()}
    searcher._ot_study, searcher._storage = study, storage


def use_current_objects(tuner, tune_config, snapshot_callback) -> bool:
    """Make a restored Tuner use this run's searcher, scheduler and :class:`SnapshotCallback` instead of the
    ones pickled in ``tuner.pkl`` (which name the experiment's old place, so a moved or copied experiment
    would write into the original); other callbacks stay. False when the Tuner runs through Ray Client
    (``ray://``), whose Tuner lives on the cluster and cannot be changed from here."""
    internal = getattr(tuner, "_local_tuner", None)
    if internal is None:
        return False
    internal._tune_config.search_alg = tune_config.search_alg
    internal._tune_config.scheduler = tune_config.scheduler
    callbacks = internal._run_config.callbacks or []
    internal._run_config.callbacks = [snapshot_callback if isinstance(cb, SnapshotCallback) else cb
                                      for cb in callbacks]
    return True


SCHEDULER_STATE_FORMAT = 1


def scheduler_state(scheduler) -> dict:
    """ASHA's state as JSON data: per bracket its rungs ``[milestone, {trial id: recorded value}]``, which
    bracket each live trial is in, and the two counters. ASHA's own ``save`` pickles its ``__dict__``;
    this replaces it so that an experiment folder holds no pickle of ours (a pickle runs code when read)."""
    bracket_index = {id(bracket): i for i, bracket in enumerate(scheduler._brackets)}
    return {"format": SCHEDULER_STATE_FORMAT, "scheduler": type(scheduler).__name__,
            "brackets": [[[milestone, dict(recorded)] for milestone, recorded in bracket._rungs]
                         for bracket in scheduler._brackets],
            "trial_bracket": {tid: bracket_index[id(b)] for tid, b in scheduler._trial_info.items()},
            "num_stopped": scheduler._num_stopped, "counter": scheduler._counter}


def restore_scheduler_state(scheduler, state: dict) -> None:
    """Put :func:`scheduler_state`'s data back into ``scheduler`` (built with the same settings); a trial
    the scheduler already placed keeps its bracket. ValueError when the data does not fit it."""
    brackets = state.get("brackets") if isinstance(state, dict) else None
    if (state.get("format") != SCHEDULER_STATE_FORMAT or not isinstance(brackets, list)
            or len(brackets) != len(scheduler._brackets)):
        raise ValueError(f"the scheduler state does not fit this scheduler: {str(state)[:200]}")
    for bracket, saved in zip(scheduler._brackets, brackets):
        if [milestone for milestone, _ in bracket._rungs] != [milestone for milestone, _ in saved]:
            raise ValueError(f"the saved rungs {[m for m, _ in saved]} are not this scheduler's")
        bracket._rungs = [(milestone, {tid: float(v) for tid, v in recorded.items()}) for milestone, recorded in saved]
    for tid, index in state["trial_bracket"].items():
        scheduler._trial_info.setdefault(tid, scheduler._brackets[index])
    scheduler._num_stopped, scheduler._counter = int(state["num_stopped"]), int(state["counter"])


def _define_callback() -> None:
    global SnapshotCallback
    from ray.tune import Callback

    class SnapshotCallback(Callback):
        """Persists ASHA's state (and a URI experiment's journal) at every experiment snapshot, and
        restores ASHA's state when the experiment starts again (``resume``).

        Tune calls ``get_state`` of every callback when it saves the experiment state (every ~10 s and at
        the end): that is when ``scheduler_state.json`` is written (:func:`scheduler_state`); it returns None (nothing for Tune to
        keep). ``location`` is a :class:`selmix_ray.storage.Location`; ``journal`` the local journal file;
        ``searcher`` the :class:`StudySearch`, told at the experiment's end (after Tune's final snapshot is
        on storage) to tell Optuna the outcomes it still holds.
        """

        def __init__(self, location, journal: Path, scheduler=None, searcher=None):
            self.location = location
            self.journal = journal
            self.scheduler = scheduler
            self.searcher = searcher

        def setup(self, **info) -> None:
            if self.scheduler is None:
                return
            if self.location.exists(SCHEDULER_STATE_FILE):
                restore_scheduler_state(self.scheduler, json.loads(self.location.read_bytes(SCHEDULER_STATE_FILE)))
            elif self.location.exists(LEGACY_SCHEDULER_STATE_FILE):  # resume trusts the folder (README)
                with tempfile.TemporaryDirectory() as folder:
                    path = os.path.join(folder, LEGACY_SCHEDULER_STATE_FILE)
                    Path(path).write_bytes(self.location.read_bytes(LEGACY_SCHEDULER_STATE_FILE))
                    self.scheduler.restore(path)  # a pickle: written as JSON from the next snapshot on

        def get_state(self):
            self.snapshot()
            return None

        def on_experiment_end(self, trials, **info) -> None:
            if self.searcher is not None:  # after Tune's final snapshot reached storage (or failed to)
                self.searcher.tell_listed()
            self.snapshot()

        def snapshot(self) -> None:
            if self.scheduler is not None:
                data = json.dumps(scheduler_state(self.scheduler), indent=1, allow_nan=True)
                self.location.write_bytes(SCHEDULER_STATE_FILE, data.encode())
            if self.location.is_uri and self.journal.exists():
                self.location.write_bytes(JOURNAL_FILE, self.journal.read_bytes())
