"""Sweeps on the test session's real local Ray cluster: pruning told as PRUNED, retries from checkpoints,
a SIGKILLed driver resumed to exactly num_samples trials with ASHA's rungs intact, and bad inputs.

Trials are tiny (digits, backbone "identity", d = 64): a sweep's cost is mostly Ray workers importing torch.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SWEEP_DRIVER, kill_after_results, trial_results

from selmix_ray.constants import JOURNAL_FILE, MANIFEST_FILE, SCHEDULER_STATE_FILE, SCORE_KEY, STEP_KEY
from selmix_ray.errors import ConfigError, ExperimentError
from selmix_ray.history import dense_counts

SPACE = {
    "objective": "min_recall",
    "space": {
        "method": {"choice": ["selmix", "uniform_mixup"]},
        "lr": {"loguniform": [0.01, 10.0]},
        "refresh_every": {"int": [2, 20], "log": True},
    },
    "fixed": {"steps": 40, "eval_every": 10},
}


def _study(journal: Path, name: str):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(journal))))


def _states(study) -> dict[str, int]:
    out: dict[str, int] = {}
    for trial in study.trials:
        out[trial.state.name] = out.get(trial.state.name, 0) + 1
    return out


def _trial_dirs(experiment: Path) -> dict[str, Path]:
    out = {}
    for folder in experiment.iterdir():
        if (folder / "result.json").is_file() and (folder / "result.json").stat().st_size:
            out[trial_results(folder)[0]["trial_id"]] = folder
    return out


def _rungs(path: Path) -> dict[tuple[int, str], float]:
    state = json.loads(path.read_bytes())
    return {(milestone, trial_id): value for bracket in state["brackets"]
            for milestone, recorded in bracket for trial_id, value in recorded.items()}


# -- bad inputs: one clear error each, before Ray is touched --------------------------------------------


def test_unknown_parameter_is_one_config_error(digits, tmp_path):
    space = {**SPACE, "space": {**SPACE["space"], "learning_rate": {"uniform": [0.1, 1.0]}}}
    with pytest.raises(ConfigError, match="learning_rate"):
        from selmix_ray.sweep import search

        search(space, features=digits, storage=tmp_path, name="x", num_samples=2)
    assert not (tmp_path / "x").exists()


def test_empty_range_is_one_config_error(digits, tmp_path):
    from selmix_ray.sweep import search

    space = {**SPACE, "space": {**SPACE["space"], "lr": {"loguniform": [1.0, 1.0]}}}
    with pytest.raises(ConfigError, match="empty"):
        search(space, features=digits, storage=tmp_path, name="x", num_samples=2)


def test_missing_features_and_bad_options_are_config_errors(digits, tmp_path):
    from selmix_ray.sweep import search

    with pytest.raises(ConfigError, match="features is required"):
        search(SPACE, features=None, storage=tmp_path, name="x", num_samples=2)
    with pytest.raises(ConfigError) as error:
        search(SPACE, features=digits, storage=tmp_path, name="x", num_samples=0, scheduler="hyperband")
    assert len(error.value.problems) == 2 and "num_samples" in str(error.value)


def test_non_writable_storage_is_an_experiment_error(digits, tmp_path):
    from selmix_ray.sweep import search

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ExperimentError, match="Cannot write to storage"):
        search(SPACE, features=digits, storage=blocker / "runs", name="x", num_samples=2)


def test_existing_name_is_refused_with_resume_hint(digits, tmp_path):
    from selmix_ray.sweep import search

    (tmp_path / "taken").mkdir()
    with pytest.raises(ExperimentError, match=r"already exists.*resume\("):
        search(SPACE, features=digits, storage=tmp_path, name="taken", num_samples=2)


def test_resume_of_a_non_experiment_is_an_experiment_error(tmp_path):
    from selmix_ray.sweep import resume

    with pytest.raises(ExperimentError, match="not a selmix-ray experiment"):
        resume(tmp_path)


# -- one ASHA sweep on a file:// URI with the fault hook on -----------------------------------------------


@pytest.mark.slow
def test_asha_sweep_prunes_retries_from_checkpoints_and_keeps_the_journal(ray_cluster, digits, tmp_path,
                                                                           monkeypatch):
    from selmix_ray.engine import FinetuneConfig, finetune
    from selmix_ray.space import load_space
    from selmix_ray.sweep import search
    from selmix_ray.trainable import FAULT_ENV, FAULT_LIMIT_ENV

    monkeypatch.setenv(FAULT_ENV, "20")  # the first trial that reaches step 20 raises once, then retries
    monkeypatch.setenv(FAULT_LIMIT_ENV, "1")
    # lr 0.001 leaves the head as it was, lr 1 lifts min recall by step 10: ASHA must stop some of the
    # former. One trial at a time makes the arrival order, hence ASHA's decisions, reproducible.
    space = {**SPACE, "space": {"lr": {"choice": [0.001, 1.0]}, "refresh_every": {"int": [2, 20]}}}
    run = search(space, features=digits, storage=f"file://{tmp_path}", name="asha", num_samples=8,
                 max_concurrent=1, seed=3)
    experiment = tmp_path / "asha"

    # Exactly num_samples trials on both sides; ASHA stopped some, Optuna has them PRUNED.
    study = _study(experiment / JOURNAL_FILE, "asha")  # copied into the URI experiment at the end
    states = _states(study)
    assert len(run.df) == 8 and len(study.trials) == 8
    assert states.get("PRUNED", 0) >= 1 and states.get("PRUNED", 0) + states.get("COMPLETE", 0) == 8
    statuses = run.df["status"].value_counts().to_dict()
    assert statuses.get("pruned", 0) == states["PRUNED"] and statuses.get("complete", 0) == states["COMPLETE"]
    assert (experiment / SCHEDULER_STATE_FILE).is_file() and (experiment / MANIFEST_FILE).is_file()
    assert set(run.baselines) >= {"start", "erm", "uniform_mixup", "start+class_weights"}

    # Trials that reached step 20 failed once and continued from that checkpoint: no step reported twice,
    # and the final numbers equal an uninterrupted run of the same configuration.
    space = load_space(space)
    failures = run.df.set_index("trial_id")["num_failures"]
    assert failures.sum() == 1
    retried = failures.idxmax()
    for trial_id, folder in _trial_dirs(experiment).items():
        steps = [int(r[STEP_KEY]) for r in trial_results(folder)]
        assert steps == sorted(set(steps)), f"trial {trial_id} restarted from scratch: {steps}"
        if trial_id == retried:  # went on after the fault (ASHA may still stop it at the step-30 rung)
            assert steps[-1] >= 30
            params = json.loads((folder / "params.json").read_text())
            config = FinetuneConfig.from_dict({**space.trial_config(params), "seed": 3, "device": "cpu"})
            reference = []
            finetune(digits, config, report=reference.append)
            expected = {int(r[STEP_KEY]): r for r in reference}[steps[-1]]
            final = trial_results(folder)[-1]
            for key in (SCORE_KEY, "val/objective", "test/objective", "test_at_best/objective"):
                assert final[key] == pytest.approx(expected[key], abs=1e-12), key


# -- a driver killed with SIGKILL, then resume ----------------------------------------------------------


def _snapshot_trials(experiment: Path) -> dict[str, str]:
    """trial_id -> Tune status in the newest experiment snapshot."""
    files = sorted(experiment.glob("experiment_state-*.json"))
    if not files:
        return {}
    try:
        state = json.loads(files[-1].read_text())
    except ValueError:
        return {}
    out = {}
    for trial_json, _ in state["trial_data"]:
        trial = json.loads(trial_json)
        out[trial["trial_id"]] = trial["status"]
    return out


@pytest.mark.slow
def test_sigkilled_driver_resumes_to_exactly_num_samples(ray_cluster, digits, cache_home, tmp_path):
    from selmix_ray.sweep import resume

    num_samples = 10
    space = {**SPACE, "fixed": {"steps": 300, "eval_every": 30}}  # ~1-3 s per trial: time to kill mid-sweep
    experiment = tmp_path / "killed"
    child = subprocess.Popen(
        [sys.executable, SWEEP_DRIVER, ray_cluster, str(tmp_path), "killed", str(num_samples), json.dumps(space)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ},
    )
    kill_after_results(child, experiment, k=25)  # of 10 trials x 11 reports: mid-sweep, whenever Tune snapshots
    time.sleep(1.0)  # the killed driver's trials stop with it

    snapshot = _snapshot_trials(experiment)
    finished_before = {tid: trial_results(folder)[-1][SCORE_KEY] for tid, folder in _trial_dirs(experiment).items()
                       if trial_results(folder)[-1][STEP_KEY] >= space["fixed"]["steps"]}
    assert len(finished_before) < num_samples, "killed too late to test anything"
    rungs_before = _rungs(experiment / SCHEDULER_STATE_FILE) if snapshot else {}  # {} when killed before
    from selmix_ray.tune_adapter import damaged_snapshot_files

    if damaged_snapshot_files(os.listdir(experiment), lambda n: (experiment / n).read_bytes()):
        with pytest.raises(ExperimentError, match="are truncated"):
            resume(experiment)
        pytest.skip("killed while Tune uploaded its snapshot: resume refused, naming the files (README)")

    # A changed space is refused, naming the difference, before anything runs.
    changed = {**space, "fixed": {"steps": 600, "eval_every": 30}}
    with pytest.raises(ExperimentError, match="fixed.steps"):
        resume(experiment, space=changed)

    # Plant an orphan: an Optuna trial asked after the last snapshot, unknown to Tune.
    orphan = _study(experiment / JOURNAL_FILE, "killed").ask().number

    run = resume(experiment)  # features rebuilt from the manifest (a cache hit)

    study = _study(experiment / JOURNAL_FILE, "killed")
    states = _states(study)
    assert len(run.df) == num_samples
    assert states.get("RUNNING", 0) == 0
    assert states.get("COMPLETE", 0) + states.get("PRUNED", 0) == num_samples
    assert study.trials[orphan].state.name == "FAIL"
    after = _trial_dirs(experiment)
    for trial_id, score in finished_before.items():
        assert trial_results(after[trial_id])[-1][SCORE_KEY] == score
    rungs_after = _rungs(experiment / SCHEDULER_STATE_FILE)
    assert {key: rungs_after.get(key) for key in rungs_before} == rungs_before


# -- repeats and multi-objective through real (tiny) sweeps; Ray's ownership -------------------------------


@pytest.mark.slow
def test_repeats_sweep_checkpoints_every_copy_and_results_load_it(ray_cluster, digits, tmp_path):
    import numpy as np
    import ray

    from selmix_ray.constants import BASELINES_FILE, HISTORY_FILE
    from selmix_ray.metrics import confusion_counts
    from selmix_ray.sweep import search

    space = {"objective": "min_recall", "space": {"lr": {"loguniform": [0.1, 10.0]}},
             "fixed": {"steps": 20, "eval_every": 10}}
    run = search(space, features=digits, storage=tmp_path, name="rep", num_samples=2, max_concurrent=2,
                 scheduler="fifo", repeats=2, seed=4)
    assert ray.is_initialized()  # the caller's Ray (the session's cluster) is left running
    experiment = tmp_path / "rep"
    manifest = json.loads((experiment / MANIFEST_FILE).read_text())
    assert manifest["repeats"] == 2 and manifest["train_counts"] == digits.train_counts.tolist()

    assert len(run.df) == 2 and set(run.df["status"]) == {"complete"}
    for trial_id, folder in _trial_dirs(experiment).items():
        newest = sorted(folder.glob("checkpoint_*"))[-1]
        assert sorted(p.name for p in newest.iterdir()) == [
            "finetune_state_0.pt", "finetune_state_1.pt", HISTORY_FILE]
        copies = json.loads((newest / HISTORY_FILE).read_text())
        assert [[r["step"] for r in c["records"]] for c in copies] == [[0, 10, 20]] * 2
        assert [c["meta"]["config"]["seed"] for c in copies] == [4, 5]
        history = run.history(trial_id)  # results read both copies
        assert len(history.copies) == 2 and history.steps == [0, 10, 20]
        reported = trial_results(folder)[-1][SCORE_KEY]  # the mean of the copies' scores
        assert reported == pytest.approx(np.mean([c["records"][-1]["metrics"][SCORE_KEY] for c in copies]))

    # Baselines carry their confusion counts at the best report, summed over the copies: the starting
    # head (steps = 0) is the same in both copies, so they are twice its own validation confusion.
    start = json.loads((experiment / BASELINES_FILE).read_text())["baselines"]["start"]
    predictions = np.argmax(digits.val.x @ digits.weight.T + digits.bias, axis=1)
    expected = 2 * confusion_counts(digits.val.y, predictions, digits.n_classes)
    np.testing.assert_array_equal(dense_counts(start["val"]["counts"], digits.n_classes), expected)
    assert dense_counts(start["test"]["counts"]).sum() == 2 * len(digits.test.y)


@pytest.mark.slow
def test_multi_objective_sweep_ends_with_complete_trials_holding_both_values(ray_cluster, digits, tmp_path):
    from selmix_ray.sweep import search

    space = {"objectives": ["min_recall", "mean_recall"],
             "space": {"lr": {"loguniform": [0.1, 10.0]}, "refresh_every": {"int": [2, 20]}},
             "fixed": {"steps": 20, "eval_every": 10}}
    run = search(space, features=digits, storage=tmp_path, name="multi", num_samples=3, max_concurrent=2,
                 seed=2)
    manifest = json.loads((tmp_path / "multi" / MANIFEST_FILE).read_text())
    assert manifest["scheduler"] == "none" and manifest["sampler"] == "nsga2"
    study = _study(tmp_path / "multi" / JOURNAL_FILE, "multi")
    assert len(study.directions) == 2
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    reported = sorted([final[SCORE_KEY], final["val/mean_recall"]]
                      for final in (trial_results(folder)[-1] for folder in _trial_dirs(tmp_path / "multi").values()))
    for values, expected in zip(sorted(trial.values for trial in study.trials), reported):
        assert values == pytest.approx(expected, abs=1e-12)
    assert len(run.df) == 3


def test_a_ray_that_search_started_is_shut_down_and_the_callers_is_not(monkeypatch):
    import importlib

    import ray

    cluster = importlib.import_module("selmix_ray.cluster")

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(("init", kwargs["address"])))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append(("shutdown",)))
    started = cluster.init_ray("auto")
    cluster.shutdown_ray(started)
    assert calls == [("init", "auto"), ("shutdown",)]

    calls.clear()
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    cluster.shutdown_ray(cluster.init_ray(None))
    assert calls == []


def test_resume_sets_aside_trial_folders_the_last_snapshot_does_not_list(tmp_path):
    import importlib

    from selmix_ray.constants import ORPHANS_DIR
    from selmix_ray.ownership import ExperimentLock
    from selmix_ray.storage import Location

    orphans = importlib.import_module("selmix_ray.orphans")

    experiment = tmp_path / "exp"
    for name in ("run_trial_known_1", "run_trial_orphan_2"):
        (experiment / name).mkdir(parents=True)
        (experiment / name / "params.json").write_text("{}")
    (experiment / "run_trial_orphan_2" / "result.json").write_text('{"step": 100}\n')  # finished work
    (experiment / "not_a_trial").mkdir()
    trial = json.dumps({"trial_id": "known", "relative_logdir": "run_trial_known_1"})
    (experiment / "experiment_state-2026-01-01_00-00-00.json").write_text(
        json.dumps({"trial_data": [[json.dumps({"relative_logdir": "gone"}), {}]]}))
    (experiment / "experiment_state-2026-01-01_00-00-10.json").write_text(
        json.dumps({"trial_data": [[trial, {}]]}))  # the newest snapshot is the one Tune restores
    lock = ExperimentLock(Location.of_experiment(experiment), "resume")
    with pytest.raises(RuntimeError, match="only under the experiment's lock"):
        orphans.set_aside_orphan_trial_folders(Location.of_experiment(experiment), lock)
    lock.acquire()
    for copy, storage in enumerate((str(experiment), f"file://{experiment}")):  # the second: synced back
        assert orphans.set_aside_orphan_trial_folders(Location.of_experiment(storage), lock) == ["run_trial_orphan_2"]
        assert sorted(p.name for p in experiment.iterdir() if p.is_dir()) == [
            "not_a_trial", ORPHANS_DIR, "run_trial_known_1"]
        kept = experiment / ORPHANS_DIR / ("run_trial_orphan_2" + (f".{copy}" if copy else ""))
        assert (kept / "result.json").read_text() == '{"step": 100}\n'  # nothing deleted
        (experiment / "run_trial_orphan_2").mkdir()
        (experiment / "run_trial_orphan_2" / "params.json").write_text("{}")
        (experiment / "run_trial_orphan_2" / "result.json").write_text('{"step": 100}\n')
    (experiment / "experiment_state-2026-01-01_00-00-10.json").write_text('{"trial_data": [')  # half-written
    assert orphans.set_aside_orphan_trial_folders(Location.of_experiment(experiment), lock) == []
    lock.release()
    assert (experiment / "run_trial_orphan_2").is_dir()


def test_resume_sets_aside_checkpoints_the_final_snapshot_does_not_mention(tmp_path):
    import importlib

    from selmix_ray.constants import ORPHANS_DIR
    from selmix_ray.ownership import ExperimentLock
    from selmix_ray.storage import Location

    orphans = importlib.import_module("selmix_ray.orphans")
    experiment = tmp_path / "exp"
    for name in ("checkpoint_000000", "checkpoint_000001"):
        (experiment / "run_a" / name).mkdir(parents=True)
        (experiment / "run_a" / name / "state").write_text(name)
    runtime = json.dumps({"checkpoint_manager": "... checkpoint_000000 ..."})  # Tune restores from 000000 only
    (experiment / "experiment_state-2026-01-01_00-00-10.json").write_text(
        json.dumps({"trial_data": [[json.dumps({"trial_id": "a", "relative_logdir": "run_a"}), runtime]]}))
    location = Location.of_experiment(experiment)
    lock = ExperimentLock(location, "resume")
    with pytest.raises(RuntimeError, match="only under the experiment's lock"):
        orphans.set_aside_unlisted_checkpoints(location, lock)
    with lock:
        assert orphans.set_aside_unlisted_checkpoints(location, lock) == ["run_a/checkpoint_000001"]
    assert sorted(p.name for p in (experiment / "run_a").iterdir()) == ["checkpoint_000000"]
    assert (experiment / ORPHANS_DIR / "run_a" / "checkpoint_000001" / "state").read_text() == "checkpoint_000001"


def test_nsga2_sampler_pickles_and_keeps_sampling_after_a_round_trip():
    """Tune pickles the searcher into its experiment state; Optuna 5.1's NSGAIISampler holds a lock."""
    import pickle

    import optuna

    from selmix_ray.sweep import PicklableNSGAIISampler

    def objective(trial):
        return trial.suggest_float("x", 0, 1), trial.suggest_float("y", 0, 1)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = PicklableNSGAIISampler(seed=0)
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=sampler)
    study.optimize(objective, n_trials=5)
    restored = pickle.loads(pickle.dumps(sampler))
    assert restored._thread_lock is not sampler._thread_lock and restored._thread_lock.acquire(blocking=False)
    restored._thread_lock.release()
    study.sampler = restored
    study.optimize(objective, n_trials=5)
    assert len(study.trials) == 10 and all(t.state.name == "COMPLETE" for t in study.trials)


def test_a_finished_trial_is_told_only_once_the_snapshot_on_storage_lists_it(tmp_path):
    """The study never holds a finished trial that the experiment snapshot on storage does not list.

    Plays Tune's calls by hand. Tune writes a snapshot to its staging folder (calling the searcher's
    ``save``) and uploads it later; ``upload`` plays a finished upload. Trials a and b finish and are held;
    at the next save storage lists a, which is told; b started after that upload, and stays held through a
    staging save whose upload never lands; a driver killed now leaves a storage snapshot without b and a searcher state (the newer
    one) that holds b: restore forgets b and marks it FAIL, and the generator's counter and concurrency
    slots count a alone. Had the driver lived, the next upload would have let b be told.
    """
    import optuna
    from ray.tune.search import ConcurrencyLimiter

    from selmix_ray.space import load_space
    from selmix_ray.storage import Location, journal_storage
    from selmix_ray.sweep import StudySearch, StudySearchGenerator

    space = load_space({"objective": "min_recall", "space": {"lr": {"loguniform": [0.1, 10.0]}},
                        "fixed": {"steps": 100, "eval_every": 10}}).define_by_run()  # picklable, as in sweeps
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    uploads = []

    def upload(location, *trial_ids):
        uploads.append(trial_ids)
        records = [[json.dumps({"trial_id": t, "relative_logdir": f"run_{t}"}), {}] for t in trial_ids]
        location.write_bytes(f"experiment_state-2026-01-01_00-00-{len(uploads):02d}.json",
                             json.dumps({"trial_data": records}).encode())

    def searcher(location):
        return StudySearch(space=space, metric="val/best_objective", mode="max", steps=100,
                           sampler=optuna.samplers.RandomSampler(seed=0), study_name="s",
                           storage=journal_storage(Path(location.path) / JOURNAL_FILE), location=location)

    killed = Location(tmp_path, "killed")
    journal = Path(killed.path) / JOURNAL_FILE
    live = searcher(killed)
    live_generator = StudySearchGenerator(ConcurrencyLimiter(live, max_concurrent=2))
    live.suggest("a")
    live.save(str(tmp_path / "staging1.pkl"))
    upload(killed, "a")  # the upload of that snapshot lands
    live.suggest("b")
    live.on_trial_complete("a", {"val/best_objective": 0.5, "step": 100})
    live.on_trial_complete("b", {"val/best_objective": 0.7, "step": 30})
    assert [t.state.name for t in _study(journal, "s").trials] == ["RUNNING", "RUNNING"]  # both held
    live.save(str(tmp_path / "staging2.pkl"))  # a staged snapshot lists b, but its upload never lands
    assert [t.state.name for t in _study(journal, "s").trials] == ["COMPLETE", "RUNNING"]  # a: on storage
    live.on_trial_complete("a", {"val/best_objective": 0.1, "step": 100})  # told once: a retry changes nothing
    assert _study(journal, "s").trials[0].value == 0.5
    live_generator._counter, live_generator.searcher.live_trials = 2, {"b"}  # as Tune left them
    (tmp_path / "staging").mkdir()
    live_generator.save_to_dir(str(tmp_path / "staging"), session_str="x")

    restored = searcher(killed)  # the driver was killed; resume restores from storage
    generator = StudySearchGenerator(ConcurrencyLimiter(restored, max_concurrent=2))
    generator.restore_from_dir(str(tmp_path / "staging"))  # the newer searcher state, which holds b
    assert [t.state.name for t in _study(journal, "s").trials] == ["COMPLETE", "FAIL"]
    assert set(restored._ot_trials) == {"a"} and restored._untold == {}
    assert generator._counter == 1 and generator.searcher.live_trials == set()  # b is replaced, not waited for

    lived = Location(tmp_path, "lived")  # the same with no kill: c is told once an upload lists it
    live = searcher(lived)
    live.suggest("c")
    live.on_trial_complete("c", {"val/best_objective": 0.9, "step": 100})
    live.save(str(tmp_path / "lived1.pkl"))
    assert _study(Path(lived.path) / JOURNAL_FILE, "s").trials[0].state.name == "RUNNING"
    upload(lived, "c")
    live.tell_listed()  # the next save, or the experiment's end
    (trial,) = _study(Path(lived.path) / JOURNAL_FILE, "s").trials
    assert trial.state.name == "COMPLETE" and trial.value == 0.9


def test_search_options_accept_numpy_integers_and_refuse_bools():
    import numpy as np

    from selmix_ray.sweep import _check_search_options

    options = dict(num_samples=np.int64(4), max_concurrent=np.int32(2), resources_per_trial={"cpu": np.float32(0.5)},
                   scheduler="asha", sampler="tpe", repeats=np.int64(2), seed=np.int64(0), name="x",
                   checkpoint_every=np.int16(3))
    checked = _check_search_options(**options)  # no error; Python numbers for the manifest's JSON
    assert json.loads(json.dumps(checked)) == {**options, "num_samples": 4, "max_concurrent": 2, "repeats": 2,
                                               "seed": 0, "checkpoint_every": 3, "resources_per_trial": {"cpu": 0.5}}
    with pytest.raises(ConfigError) as error:
        _check_search_options(**{**options, "num_samples": True, "seed": False, "resources_per_trial": {"gpu": True}})
    assert error.value.problems == [
        "num_samples must be an integer >= 1, but got num_samples=True.",
        "seed must be an integer >= 0, but got seed=False.",
        "resources_per_trial['gpu'] must be a number >= 0, but got True.",
    ]


def test_experiments_pickled_before_the_split_still_find_their_classes():
    """Tune pickles the Tuner (callbacks with their Location, the searcher) into the experiment; resume
    unpickles it by the names the experiment was started with."""
    from selmix_ray.storage import Location
    from selmix_ray.tune_adapter import PicklableNSGAIISampler, SnapshotCallback, StudySearch

    for name, expected in [("_Location", Location), ("SnapshotCallback", SnapshotCallback),
                           ("StudySearch", StudySearch), ("PicklableNSGAIISampler", PicklableNSGAIISampler)]:
        assert pickle.loads(f"cselmix_ray.sweep\n{name}\n.".encode()) is expected, name
