"""Pins for selmix_ray.tune_adapter: the installed Ray Tune and Optuna still have the private attributes and
behaviour it relies on, and their versions are the tested ones. A failure names the adapter function to
revisit; the rest checks the adapter's own Ray-free parts (experiment-state parser, log filter).

Fast: nothing here starts Ray.
"""

from __future__ import annotations

import inspect
import json
import logging
import pickle
import re
import subprocess
import sys
import threading

import pytest

from selmix_ray import tune_adapter
from selmix_ray.tune_adapter import (
    EXPERIMENT_STATE_PREFIX,
    SNAPSHOT_LOGGER,
    SNAPSHOT_WARNING,
    TuneTrialState,
    experiment_state_files,
    parse_experiment_state,
    quiet_snapshot_warning,
    read_trial_states,
)

SPACE = {"objective": "min_recall", "space": {"lr": {"loguniform": [0.1, 10.0]}},
         "fixed": {"steps": 100, "eval_every": 10}}


def _revisit(name: str) -> str:
    return f"the installed Ray/Optuna changed what selmix_ray.tune_adapter.{name} relies on: revisit it"


def _joined_source(obj) -> str:
    """Source text with adjacent string literals joined (a message split over lines reads as one)."""
    return re.sub(r"\"\s*\n\s*f?\"", "", inspect.getsource(obj))


# -- versions ----------------------------------------------------------------------------------------------


def test_installed_versions_are_the_tested_ones():
    problems = tune_adapter.untested_versions()
    assert problems == [], (" ".join(problems) + " Run tests/test_tune_adapter.py and the slow sweep tests on "
                            "the new version, then widen TESTED_VERSIONS.")


def test_untested_versions_names_a_package_outside_its_range(monkeypatch):
    monkeypatch.setitem(tune_adapter.TESTED_VERSIONS, "ray", ((9, 0), (9, 1)))
    (problem,) = tune_adapter.untested_versions()
    assert problem.startswith("ray ") and "outside the tested range [9.0, 9.1)" in problem


# -- OptunaSearch internals (StudySearch) -------------------------------------------------------------------


def _optuna_search(**kwargs):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from selmix_ray.space import load_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return OptunaSearch(space=load_space(SPACE).define_by_run(), metric="val/best_objective", mode="max",
                        sampler=optuna.samplers.RandomSampler(seed=0), **kwargs)


def test_optuna_search_keeps_the_private_state_study_search_uses(tmp_path):
    import optuna

    searcher = _optuna_search()
    message = _revisit("StudySearch")
    assert isinstance(getattr(searcher, "_ot_study", None), optuna.Study), message
    assert getattr(searcher, "_ot_trials", None) == {}, message
    assert getattr(searcher, "_completed_trials", None) == set(), message

    config = searcher.suggest("a")
    assert 0.1 <= config["lr"] <= 10.0
    assert isinstance(searcher._ot_trials["a"], optuna.trial.Trial), message
    searcher.on_trial_complete("a", {"val/best_objective": 0.5, "step": 100})
    assert "a" in searcher._completed_trials, message
    (trial,) = searcher._ot_study.get_trials(deepcopy=False)
    assert trial.state.name == "COMPLETE" and trial.value == 0.5, message

    # save/restore pickle the searcher's __dict__: a restored one has the same trials and study.
    searcher.suggest("b")
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = _optuna_search()
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert set(restored._ot_trials) == {"a", "b"} and restored._completed_trials == {"a"}, message
    assert [t.state.name for t in restored._ot_study.get_trials(deepcopy=False)] == ["COMPLETE", "RUNNING"]


def test_study_search_is_an_optuna_search_and_pickles_by_its_adapter_name():
    from ray.tune.search.optuna import OptunaSearch

    from selmix_ray.sweep import StudySearch

    assert issubclass(StudySearch, OptunaSearch)
    assert StudySearch is tune_adapter.StudySearch
    assert (StudySearch.__module__, StudySearch.__qualname__) == ("selmix_ray.tune_adapter", "StudySearch")
    assert pickle.loads(pickle.dumps(StudySearch)) is StudySearch  # Tune pickles the searcher by this name


def test_nsga2_sampler_holds_the_lock_the_picklable_subclass_replaces():
    from optuna.samplers import NSGAIISampler

    sampler = NSGAIISampler(seed=0)
    assert isinstance(getattr(sampler, "_thread_lock", None), type(threading.Lock())), \
        _revisit("PicklableNSGAIISampler")
    restored = pickle.loads(pickle.dumps(tune_adapter.PicklableNSGAIISampler(seed=0)))
    assert isinstance(restored, NSGAIISampler) and restored._thread_lock.acquire(blocking=False)
    restored._thread_lock.release()


# -- Tune's snapshots (SnapshotCallback, the experiment-state parser) ---------------------------------------


def test_tune_calls_every_callbacks_get_state_when_it_snapshots():
    from ray.tune.callback import CallbackList
    from ray.tune.execution.tune_controller import TuneController

    message = _revisit("SnapshotCallback")
    assert "self._callbacks.save_to_dir(" in inspect.getsource(TuneController.save_to_dir), message
    assert "self.get_state()" in inspect.getsource(CallbackList.save_to_dir), message
    assert "callback.get_state()" in inspect.getsource(CallbackList.get_state), message
    # Tune restores the searcher and the callbacks but not the scheduler: SnapshotCallback.setup does that.
    resume = inspect.getsource(TuneController.resume)
    assert "self._search_alg.restore_from_dir(" in resume and "self._callbacks.restore_from_dir(" in resume
    assert "_scheduler_alg.restore" not in inspect.getsource(TuneController), message
    from ray.tune import Callback

    assert issubclass(tune_adapter.SnapshotCallback, Callback)


def test_tune_writes_the_experiment_state_layout_the_parser_reads():
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment.trial import Trial

    message = _revisit("parse_experiment_state")
    name = TuneController.CKPT_FILE_TMPL.format("2026-01-01_00-00-00")
    assert experiment_state_files([name, "params.json"]) == [name], message
    assert '"trial_data": list(self._get_trial_checkpoints().values())' in inspect.getsource(
        TuneController.save_to_dir), message

    trial = Trial("selmix_fake", stub=True, _setup_default_resource=False)
    trial.relative_logdir = "run_trial_abc_00000"
    trial.run_metadata.num_failures = 2
    trial.set_status(Trial.ERROR)
    snapshot = json.dumps({"trial_data": [list(trial.get_json_state())], "runner_data": {}})
    assert parse_experiment_state(snapshot) == [
        TuneTrialState(trial_id=trial.trial_id, status="ERROR", num_failures=2, relative_logdir="run_trial_abc_00000")
    ], message


def test_tune_logs_the_snapshot_warning_the_filter_drops():
    import ray.tune.execution.experiment_state as module

    assert module.logger.name == SNAPSHOT_LOGGER, _revisit("quiet_snapshot_warning")
    assert SNAPSHOT_WARNING in _joined_source(module), _revisit("quiet_snapshot_warning")


# -- the adapter's own parts (no Ray) --------------------------------------------------------------------


def test_quiet_snapshot_warning_drops_that_warning_only_and_installs_once():
    quiet_snapshot_warning()
    quiet_snapshot_warning()
    target = logging.getLogger(SNAPSHOT_LOGGER)
    assert len([f for f in target.filters if type(f).__name__ == "_DropSnapshotWarning"]) == 1

    def record(message):
        return logging.LogRecord(SNAPSHOT_LOGGER, logging.WARNING, __file__, 1, message, None, None)

    assert not target.filter(record("Experiment state snapshotting has been triggered multiple times in the last"))
    assert target.filter(record("Experiment state snapshotting took 12 s"))


def _snapshot(*trials, runtime=None) -> str:
    rows = [[json.dumps({"trial_id": t, "status": s, "relative_logdir": f"run_trial_{t}"}),
             json.dumps(runtime or {"num_failures": f})] for t, s, f in trials]
    return json.dumps({"trial_data": rows})


def test_parse_experiment_state_reads_trials_and_refuses_what_is_not_a_snapshot():
    trials = parse_experiment_state(_snapshot(("a", "TERMINATED", 0), ("b", "RUNNING", 3)))
    assert [(t.trial_id, t.status, t.num_failures, t.relative_logdir) for t in trials] == [
        ("a", "TERMINATED", 0, "run_trial_a"), ("b", "RUNNING", 3, "run_trial_b")]
    for bad in ('{"trial_data": [', "[1, 2]", '{"runner_data": {}}', '{"trial_data": [["{}"]]}'):
        with pytest.raises(ValueError):
            parse_experiment_state(bad)


def test_read_trial_states_takes_the_newest_readable_snapshot(tmp_path):
    assert read_trial_states(tmp_path) == {}
    (tmp_path / f"{EXPERIMENT_STATE_PREFIX}2026-01-01_00-00-00.json").write_text(_snapshot(("a", "RUNNING", 0)))
    (tmp_path / f"{EXPERIMENT_STATE_PREFIX}2026-01-01_00-00-10.json").write_text(
        _snapshot(("a", "TERMINATED", 1), ("b", "PENDING", 0)))
    assert {k: v.status for k, v in read_trial_states(tmp_path).items()} == {"a": "TERMINATED", "b": "PENDING"}
    (tmp_path / f"{EXPERIMENT_STATE_PREFIX}2026-01-01_00-00-20.json").write_text('{"trial_data": [["{')
    states = read_trial_states(tmp_path)  # the half-written newest one is skipped
    assert states["a"].num_failures == 1 and set(states) == {"a", "b"}


def test_importing_the_adapter_imports_neither_ray_nor_optuna():
    code = ("import json, sys\n"
            "import selmix_ray.tune_adapter, selmix_ray.results\n"
            "print(json.dumps(sorted(m for m in ('ray', 'optuna') if m in sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []
