"""An experiment's files under misuse (issue 11 items 3-5): damaged Optuna journals, moved and copied
experiments, and pickles planted in a folder received from someone else.

Each test works on copies of the session's finished 8-trial sweep (conftest ``sweep``), whose original is
checked to stay byte-for-byte as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from selmix_ray.constants import JOURNAL_FILE, LEGACY_SCHEDULER_STATE_FILE, SCHEDULER_STATE_FILE
from selmix_ray.errors import ExperimentError

REPO = Path(__file__).resolve().parent.parent


def _fingerprint(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _study_states(journal: Path, name: str) -> dict[int, str]:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(journal))))
    return {trial.number: trial.state.name for trial in study.trials}


def _plant_running_orphan(journal: Path, name: str) -> int:
    """An Optuna trial asked after the last snapshot (what a killed driver leaves): resume marks it FAIL."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(journal)))
    return optuna.load_study(study_name=name, storage=storage).ask().number


class Marker:
    """A pickle that, when loaded, creates the file at ``path`` (what a crafted pickle could do)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


# -- item 3: damaged journals -----------------------------------------------------------------------------


def test_a_journal_cut_mid_file_is_refused_before_anything_is_written(sweep, digits, tmp_path):
    from selmix_ray.sweep import resume

    experiment = tmp_path / "single"
    shutil.copytree(sweep, experiment)
    data = (experiment / JOURNAL_FILE).read_bytes()
    (experiment / JOURNAL_FILE).write_bytes(data[: len(data) // 3])  # a copy cut short, mid-line
    before = _fingerprint(experiment)
    with pytest.raises(ExperimentError, match=r"records \d+ trial\(s\), but Ray Tune's snapshot lists 8"):
        resume(experiment, features=digits)
    after = _fingerprint(experiment)
    lock = ".selmix_lock"
    assert {k: v for k, v in after.items() if k != lock} == {k: v for k, v in before.items() if k != lock}


def test_a_bad_line_in_the_middle_of_the_journal_is_refused_naming_it(sweep, tmp_path):
    from selmix_ray.journal import check_journal

    journal = tmp_path / JOURNAL_FILE
    lines = (sweep / JOURNAL_FILE).read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:5]) + b'{"op_code": 4, "stu\n' + b"".join(lines[5:]))
    before = journal.read_bytes()
    with pytest.raises(ExperimentError, match=rf"line 6 of {len(lines) + 1} .* is damaged .*head -n 5"):
        check_journal(journal, study_name="single", tune_trials=8)
    assert journal.read_bytes() == before
    journal.write_bytes(b"".join(lines))
    with pytest.raises(ExperimentError, match="holds no study named 'other'"):
        check_journal(journal, study_name="other", tune_trials=8)
    journal.unlink()
    with pytest.raises(ExperimentError, match="is missing"):
        check_journal(journal, study_name="single", tune_trials=8)


@pytest.mark.slow
def test_a_torn_tail_is_cut_with_a_backup_and_resume_restores_every_trial(ray_cluster, sweep, digits, tmp_path):
    from selmix_ray.sweep import resume

    experiment = tmp_path / "single"
    shutil.copytree(sweep, experiment)
    orphan = _plant_running_orphan(experiment / JOURNAL_FILE, "single")  # resume will append its FAIL
    whole = (experiment / JOURNAL_FILE).read_bytes()
    (experiment / JOURNAL_FILE).write_bytes(whole + b'{"op_code":4,"worker_id":"x","study_id":0,"dat')  # torn

    run = resume(experiment, features=digits)
    assert len(run.df) == 8 and set(run.df["status"]) <= {"complete", "pruned"}
    assert (experiment / JOURNAL_FILE).read_bytes().startswith(whole)
    states = _study_states(experiment / JOURNAL_FILE, "single")
    assert sum(s in ("COMPLETE", "PRUNED") for s in states.values()) == 8 and states[orphan] == "FAIL"
    assert len(list(experiment.glob(f"{JOURNAL_FILE}.torn-*"))) == 1


def test_a_snapshot_torn_by_a_kill_during_tunes_upload_is_refused_naming_it(sweep, digits, tmp_path):
    """Tune rewrites its snapshot files in place; a driver killed meanwhile leaves them truncated (seen in the
    killed-driver tests: an empty experiment_state), and Tune would then restore no trial and exit 0."""
    from selmix_ray.sweep import resume
    from selmix_ray.tune_adapter import damaged_snapshot_files

    for prefix in ("experiment_state-", "searcher-state-", "search_gen_state-", "tuner.pkl"):
        experiment = tmp_path / prefix / "single"
        shutil.copytree(sweep, experiment)
        name = sorted(p.name for p in experiment.iterdir() if p.name.startswith(prefix))[-1]
        data = (experiment / name).read_bytes()
        (experiment / name).write_bytes(data[: len(data) // 2])
        before = _fingerprint(experiment)
        with pytest.raises(ExperimentError, match=f"snapshot files {name} are truncated"):
            resume(experiment, features=digits)
        assert _fingerprint(experiment) == before
        (experiment / name).write_bytes(data)
        assert damaged_snapshot_files(os.listdir(experiment), lambda n, e=experiment: (e / n).read_bytes()) == []


# -- item 4: moved and copied experiments ----------------------------------------------------------------


@pytest.mark.slow
def test_a_copied_experiment_and_its_original_resume_each_in_its_own_place(ray_cluster, sweep, digits, tmp_path):
    from selmix_ray.sweep import resume

    session_original = _fingerprint(sweep)
    original, copy = tmp_path / "a" / "single", tmp_path / "b" / "moved"
    shutil.copytree(sweep, original)  # Tune's and the searcher's pickles name the session's folder
    shutil.copytree(original, copy)
    orphans = {path: _plant_running_orphan(path / JOURNAL_FILE, "single") for path in (original, copy)}
    (copy / LEGACY_SCHEDULER_STATE_FILE).write_bytes(pickle.dumps(Marker(tmp_path / "ran")))  # planted
    original_before = _fingerprint(original)

    run = resume(copy, features=digits)
    assert len(run.df) == 8
    assert _fingerprint(original) == original_before  # the copy wrote nothing into the original
    assert _study_states(copy / JOURNAL_FILE, "single")[orphans[copy]] == "FAIL"  # its own journal
    assert json.loads((copy / SCHEDULER_STATE_FILE).read_bytes())["brackets"]
    assert not (tmp_path / "ran").exists()  # the JSON state was read, the planted pickle never loaded

    copy_after = _fingerprint(copy)
    run = resume(original, features=digits)
    assert len(run.df) == 8 and _fingerprint(copy) == copy_after
    assert _study_states(original / JOURNAL_FILE, "single")[orphans[original]] == "FAIL"
    assert _fingerprint(sweep) == session_original


# -- item 5: no code runs from a received folder's files ------------------------------------------------


def test_scheduler_state_is_json_that_restores_asha_exactly():
    from ray.tune.schedulers import ASHAScheduler

    from selmix_ray.tune_adapter import restore_scheduler_state, scheduler_state

    def asha():
        return ASHAScheduler(time_attr="step", metric="m", mode="max", max_t=90, grace_period=10, reduction_factor=3)

    live = asha()
    for bracket_index, bracket in enumerate(live._brackets):
        for milestone, recorded in bracket._rungs:
            recorded[f"t{milestone}"] = milestone / 100
        live._trial_info[f"live{bracket_index}"] = bracket
    live._num_stopped, live._counter = 3, 7
    data = json.loads(json.dumps(scheduler_state(live)))  # plain JSON data
    restored = asha()
    restored._trial_info["added_before_restore"] = restored._brackets[0]
    restore_scheduler_state(restored, data)
    assert [b._rungs for b in restored._brackets] == [b._rungs for b in live._brackets]
    assert {t: live._brackets.index(b) for t, b in live._trial_info.items()} == \
        {t: restored._brackets.index(b) for t, b in restored._trial_info.items() if t != "added_before_restore"}
    assert "added_before_restore" in restored._trial_info  # a trial placed before the restore keeps its bracket
    assert (restored._num_stopped, restored._counter) == (3, 7)
    with pytest.raises(ValueError, match="not this scheduler's"):
        restore_scheduler_state(ASHAScheduler(time_attr="step", metric="m", mode="max", max_t=90, grace_period=5),
                                data)


def test_compare_and_load_run_never_unpickle(sweep, tmp_path):
    """Every pickle in a received experiment replaced by one that creates a marker file when loaded:
    load_run and `compare` read the folder without loading any (resume, which trusts Ray's own pickles,
    is tested not to load a planted scheduler_state.pkl in the copied-experiment test)."""
    from selmix_ray.results import load_run

    experiment = tmp_path / "received"
    shutil.copytree(sweep, experiment)
    markers = []
    for path in [*experiment.rglob("*.pkl"), experiment / LEGACY_SCHEDULER_STATE_FILE]:
        markers.append(tmp_path / f"ran-{len(markers)}")
        path.write_bytes(pickle.dumps(Marker(markers[-1])))
    assert len(markers) >= 4  # tuner.pkl, searcher-state, params.pkl, scheduler_state.pkl
    assert len(load_run(experiment).df) == 8
    done = subprocess.run([sys.executable, str(REPO / "run_search.py"), "compare", str(experiment), "--top", "2"],
                          capture_output=True, text=True, timeout=300, env={**os.environ})
    assert done.returncode == 0, done.stderr[-3000:]
    assert not any(marker.exists() for marker in markers)
    pickle.loads((experiment / LEGACY_SCHEDULER_STATE_FILE).read_bytes())  # the marker pickle does work
    assert markers[-1].exists()
