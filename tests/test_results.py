"""Reading experiments: against small REAL sweeps run here (Ray Tune + Optuna on digits features).

One single-objective sweep and one multi-objective sweep are shared by the session (conftest.py: ``sweep``,
``multi_sweep``); the interrupted-sweep test runs its own driver (tests/_sweep_driver.py) in a child process
connected to the session's Ray cluster and kills it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import SWEEP_DRIVER, SWEEP_SPACE, trial_results

from selmix_ray.comparison import compare
from selmix_ray.constants import MANIFEST_FILE, METRIC_NAMES, SCORE_KEY
from selmix_ray.errors import ExperimentError
from selmix_ray.results import STATUSES, load_run

pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_trial_table_columns_rows_and_statuses(sweep):
    run = load_run(sweep)
    df = run.df
    assert len(df) == 8 and df["trial_id"].is_unique
    for column in ["trial_id", "status", "steps_reached", "steps", "wall_time_s", SCORE_KEY,
                   *(f"test_at_best/{m}" for m in METRIC_NAMES), "config/method", "config/lr", "config/s"]:
        assert column in df, column
    assert set(df["status"]) <= set(STATUSES)
    assert set(df["status"]) <= {"complete", "pruned"}  # a finished sweep
    assert (df.loc[df["status"] == "complete", "steps_reached"] == 60).all()
    assert (df.loc[df["status"] == "pruned", "steps_reached"] < 60).all()
    assert df.loc[df["config/method"] == "uniform_mixup", "config/s"].isna().all()  # conditional parameter
    table = run.table
    assert table.num_rows == 8 and table.column_names == list(df.columns)
    # Row values are the trial's last report.
    for trial_id, folder in run.trial_dirs.items():
        last = trial_results(folder)[-1]
        row = df[df["trial_id"] == trial_id].iloc[0]
        assert row[SCORE_KEY] == last[SCORE_KEY] and row["steps_reached"] == last["step"]
    best = run.best
    assert best[SCORE_KEY] == df[SCORE_KEY].max()


def test_baselines_are_read_and_marked(sweep):
    run = load_run(sweep)
    assert "start" in run.baselines
    base = run.baselines_df
    assert (base["kind"] == "baseline").all() and "start" in set(base["name"])
    comparison = compare([sweep])
    kinds = comparison.df["kind"].value_counts().to_dict()
    assert kinds == {"trial": 8, "baseline": len(run.baselines)}


@pytest.mark.parametrize("objective", ["min_recall", "mean_recall", "gmean", "hmean", None])
def test_rerank_agrees_with_reported_scalars(sweep, objective):
    """val/best_<m> from the stored confusion counts == the best val/<m> each trial reported."""
    run = load_run(sweep)
    if objective is None:  # the sweep's own objective, by default
        ranked, objective = run.rerank(), run.objective
    else:
        ranked = run.rerank(objective)
    assert len(ranked) == 8
    scores = ranked[f"val/best_{objective}"].to_numpy()
    assert np.all(np.diff(scores) <= 0)  # best first
    for _, row in ranked.iterrows():
        reports = trial_results(run.trial_dirs[row["trial_id"]])
        own = objective == run.objective  # then compare with val/objective, computed exactly as here
        values = [r["val/objective" if own else f"val/{objective}"] for r in reports]
        steps = [r["step"] for r in reports]
        assert row[f"val/best_{objective}"] == pytest.approx(max(values), abs=1e-12)
        # The best report: the first to reach the best value (val/<m> may differ from it by rounding only).
        best_index = steps.index(row["best_step"])
        assert values[best_index] == pytest.approx(max(values), abs=1e-12)
        if own:
            assert best_index == int(np.argmax(values))
        for m in ("min_recall", "mean_recall", "accuracy"):
            assert row[f"test_at_best/{m}"] == pytest.approx(reports[best_index][f"test/{m}"], abs=1e-12)
        if objective == run.objective:
            assert row[f"val/best_{objective}"] == pytest.approx(reports[-1][SCORE_KEY], abs=1e-12)


def test_compare_reranks_under_another_objective(sweep):
    comparison = compare([sweep], objective="gmean")
    trials = comparison.df[comparison.df["kind"] == "trial"].set_index("name")
    ranked = load_run(sweep).rerank("gmean").set_index("trial_id")
    assert np.allclose(trials.loc[ranked.index, "score"], ranked["val/best_gmean"])
    text = comparison.to_string(top=3)
    assert "val/best_gmean" in text and "baselines:" in text


def test_per_class_view(sweep):
    run = load_run(sweep)
    view = run.per_class(top=2)
    best_ids = list(run.df.sort_values(SCORE_KEY, ascending=False, kind="stable")["trial_id"][:2])
    assert list(view.columns[:3]) == ["band", "train_count", "start"]
    assert len(view) == 10 and set(view["band"]) == {"head", "tail"}
    for trial_id in best_ids:
        history = run.history(trial_id)
        expected = history.recall(history.index_of_step(history.best_step), "test")
        assert np.allclose(view[trial_id], expected)
        assert np.allclose(view[f"{trial_id} - start"], view[trial_id] - view["start"])
    assert np.allclose(view["start"], run.baselines["start"]["per_class_recall"]["test"])


def test_every_plot_is_a_valid_png(sweep, multi_sweep, tmp_path):
    from matplotlib.image import imread

    from selmix_ray.plots import write_plots

    written = write_plots(load_run(sweep), tmp_path / "single")
    names = {p.name for p in written}
    assert names == {"history.png", "per_class_recall.png", "objective_vs_params.png", "pair_distribution.png"}
    multi = load_run(multi_sweep)
    assert multi.is_multi_objective and "val/mean_recall" in multi.df
    written += write_plots(multi, tmp_path / "multi")
    assert "pareto.png" in {p.name for p in written}
    for path in written:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, path
        image = imread(path)
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0, path


def test_pareto_mask_against_a_slow_reference():
    from selmix_ray.plots import pareto_mask

    rng = np.random.default_rng(0)
    points = rng.integers(0, 5, size=(40, 2)).astype(float)
    expected = [not any(all(q >= p) and any(q > p) for q in points) for p in points]
    assert pareto_mask(points).tolist() == expected


def test_loads_with_ray_stopped(sweep):
    """A fresh interpreter that never imports Ray reads the experiment."""
    code = (
        "import json, sys\n"
        "from selmix_ray.results import load_run\nfrom selmix_ray.comparison import compare\n"
        f"run = load_run({str(sweep)!r})\n"
        "text = compare([run.path], objective='hmean').to_string()\n"
        "print(json.dumps([len(run.df), 'ray' in sys.modules, 'optuna' in sys.modules]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == [8, False, False]


def test_parameter_importance(sweep):
    importance = load_run(sweep).importance()
    assert set(importance) <= {"method", "s", "refresh_every", "lr", "posthoc"} and importance
    assert all(v >= 0 for v in importance.values())


def _wait_until_files_settle(folder, quiet_s=3.0, timeout_s=90.0):
    """Block until no file under `folder` has changed size or mtime for `quiet_s` seconds."""
    def snapshot():
        state = {}
        for path in folder.rglob("*"):
            try:
                stat = path.stat()
            except FileNotFoundError:  # replaced while walking
                continue
            state[path] = (stat.st_size, stat.st_mtime_ns)
        return state

    deadline = time.monotonic() + timeout_s
    last, quiet_since = snapshot(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = snapshot()
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return
    raise AssertionError(f"files under {folder} still changing {timeout_s:.0f} s after the driver was killed")


def test_loads_a_running_then_interrupted_sweep(ray_cluster, cache_home, sweep, tmp_path):
    """Poll load_run while a child driver runs a sweep, SIGKILL it mid-run, then load what is left."""
    # Slow, long trials (a gain refresh every step, large batches, 3000 steps) keep the sweep running long
    # enough to be watched, and no trial can finish in the moment between the last poll and the kill (the
    # killed driver's trial workers may report a little longer): at 60 steps a fast machine did finish them.
    space = {**SWEEP_SPACE, "space": {"refresh_every": {"int": [1, 2]}, "batch_size": {"choice": [1024]}},
             "fixed": {**SWEEP_SPACE["fixed"], "steps": 3000}}
    child = subprocess.Popen([sys.executable, SWEEP_DRIVER, ray_cluster, str(tmp_path), "live", "4", json.dumps(space),
                              "0", "fifo"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    experiment = tmp_path / "live"
    seen_running = False
    try:
        deadline = time.monotonic() + 400  # baselines first; only a broken sweep waits this long
        while time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.2)
            if not (experiment / MANIFEST_FILE).exists():
                continue
            run = load_run(experiment, intervals=False)  # must never fail while files are being written
            statuses = set(run.df["status"])
            assert statuses <= set(STATUSES)
            running = run.df[run.df["status"] == "running"]
            if (running["steps_reached"].fillna(0) >= 10).any():  # one trial both running and reported
                seen_running = True
                break
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    _wait_until_files_settle(experiment)  # the dead driver's trial workers may still write for a moment
    assert seen_running, "the sweep never showed a running trial that had reported"
    run = load_run(experiment)
    assert len(run.df) >= 1 and "running" in set(run.df["status"])
    ranked = run.rerank()
    assert len(ranked) >= 1 and ranked[f"val/best_{run.objective}"].notna().all()
    # A half-written result line and history file (a kill mid-write) are skipped, not trusted.
    trial_id = ranked["trial_id"].iloc[0]  # a trial with a checkpoint
    folder = run.trial_dirs[trial_id]
    with open(folder / "result.json", "a") as f:
        f.write('{"step": 99999, "val/best_obj')
    checkpoints = sorted(folder.glob("checkpoint_*"))
    newest = folder / f"checkpoint_{int(checkpoints[-1].name.split('_')[1]) + 1:06d}"
    newest.mkdir()
    (newest / "history.json").write_text('{"records": [')
    again = load_run(experiment)
    assert again.df["steps_reached"].max() < 99999
    assert again.history(trial_id).steps == run.history(trial_id).steps


def test_foreign_and_corrupted_directories_give_clear_errors(sweep, tmp_path):
    with pytest.raises(ExperimentError, match="is not a directory"):
        load_run(tmp_path / "missing")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hello")
    with pytest.raises(ExperimentError, match=f"not a selmix-ray experiment: it has no {MANIFEST_FILE}"):
        load_run(foreign)
    with pytest.raises(ExperimentError, match="not a selmix-ray experiment"):
        load_run(sweep.parent)  # the storage folder, not the experiment
    broken = tmp_path / "broken"
    shutil.copytree(sweep, broken)
    (broken / MANIFEST_FILE).write_text('{"name": "broken", "space": ')
    with pytest.raises(ExperimentError, match="corrupted"):
        load_run(broken)
    (broken / MANIFEST_FILE).write_text("[1, 2]")
    with pytest.raises(ExperimentError, match="corrupted"):
        load_run(broken)
    with pytest.raises(ExperimentError, match="has no trial 'nope'"):
        load_run(sweep).history("nope")
