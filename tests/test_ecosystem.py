"""selmix-ray with the rest of a Ray Tune + Optuna stack (issue 13): the ``selmix_ray`` logger and the CLI's
-q/-v, bars in a pipe, Tune callbacks / stop / time budget, the Tune <-> Optuna trial link read with plain
Optuna, ResultGrid, the CLI's error texts, and the repository's own docs. Each README snippet of "Using it
with the rest of your stack" is run here.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SWEEP_SPACE

from selmix_ray import cli
from selmix_ray.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "selmix_ray"


def _python(code: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          **kwargs)


# -- logging ------------------------------------------------------------------------------------------------


def test_library_messages_are_silent_until_logging_is_configured():
    quiet = _python("from selmix_ray.progress import log; log('hello')")
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    shown = _python("import logging; logging.basicConfig(level=logging.INFO, format='%(name)s %(message)s')\n"
                    "from selmix_ray.progress import log; log('hello')")
    assert shown.stderr.strip() == "selmix_ray hello"
    console = _python("from selmix_ray.progress import enable_console, log, debug\n"
                      "enable_console(); log('hello'); debug('detail')\n"
                      "enable_console('DEBUG'); debug('detail')\n"
                      "import logging; logging.getLogger('selmix_ray.cli').info('own line')")
    assert console.stdout.splitlines() == ["[selmix-ray] hello", "[selmix-ray] detail", "[run_search] own line"]


def test_no_print_in_the_library_outside_the_cli():
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


def test_feature_build_in_a_pipe_logs_ten_percent_lines_without_carriage_returns(tmp_path):
    """stderr and stdout are pipes: no tqdm redraws (no '\\r'), one line per 10 % of the ERM head's fit."""
    done = _python("from selmix_ray.progress import enable_console; enable_console()\n"
                   "from selmix_ray.features import build_features\n"
                   f"build_features('digits', rho=10, backbone='identity', cache_dir={str(tmp_path)!r})")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\r" not in done.stderr and "\r" not in done.stdout
    head = [line for line in done.stdout.splitlines() if line.startswith("[selmix-ray] fitting the ERM head:")]
    assert [re.search(r"\((\d+)%\)", line).group(1) for line in head] == [str(p) for p in range(10, 101, 10)]


def test_quiet_and_verbose_set_the_selmix_ray_logger_level(capsys):
    import logging

    from selmix_ray.progress import logger

    space = str(REPO / "search_spaces" / "gmean.yaml")
    try:
        assert cli.main(["validate", space, "--quiet"]) == 0
        assert logger.level == logging.WARNING
        assert cli.main(["validate", space, "-v"]) == 0
        assert logger.level == logging.DEBUG
        assert cli.main(["validate", space]) == 0
        assert logger.level == logging.INFO
        with pytest.raises(SystemExit):
            cli.main(["validate", space, "-q", "-v"])  # one or the other
    finally:
        logger.setLevel(logging.NOTSET)


def test_progress_counter_counts_every_finished_trial_of_the_experiment():
    """After a resume Tune's trial list holds the trials finished before it: they count (6/6, not 1/6)."""
    from types import SimpleNamespace

    from selmix_ray.progress import ProgressCallback, logger

    def trial(trial_id, status, score, step=60):
        return SimpleNamespace(trial_id=trial_id, status=status, last_result={"val/best_objective": score,
                                                                               "step": step}, path="/x")

    earlier = [trial(f"t{i}", "TERMINATED", 0.5 + i / 100) for i in range(5)]
    last = trial("t5", "RUNNING", 0.52, step=20)  # Tune marks it TERMINATED after the callbacks
    callback = ProgressCallback(num_samples=6, steps=60, metric="val/best_objective")
    records = []
    handler = type("H", (__import__("logging").Handler,), {"emit": lambda self, r: records.append(r.getMessage())})()
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel("INFO")
    try:
        callback.on_trial_complete(0, [*earlier, last], last)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    assert records == ["trial 6/6 t5 pruned at step 20: val/best_objective=0.5200 (best 0.5400)"]


# -- options and the CLI ----------------------------------------------------------------------------------


def test_search_refuses_bad_tune_options_all_at_once(digits, tmp_path):
    from selmix_ray.sweep import search

    with pytest.raises(ConfigError) as caught:
        search(SWEEP_SPACE, features=digits, storage=tmp_path, name="x", num_samples=2,
               callbacks=["nope", "mlflow", dict], time_budget_s=-1, stop=5)
    text = "\n".join(caught.value.problems)
    assert "'nope' is not a known name" in text
    assert "needs the mlflow package, which is not installed" in text and "pip install mlflow" in text
    assert "the class dict" in text
    assert "time_budget_s must be a number of seconds > 0, but got -1" in text
    assert "stop must be a dict" in text
    assert not (tmp_path / "x").exists()


def test_cli_callback_without_its_package_is_one_line_before_any_work(tmp_path, capsys):
    from importlib.util import find_spec

    assert find_spec("mlflow") is None  # the machine this runs on has no mlflow (pick another if it does)
    rc = cli.main(["search", str(REPO / "search_spaces" / "gmean.yaml"), "--dataset", "digits", "--callback",
                   "mlflow", "--storage", str(tmp_path / "results"), "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "pip install mlflow" in err
    assert "--callback" in err and "Traceback" not in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "results").exists()


def test_cli_writes_library_errors_in_command_line_form(digits, tmp_path, capsys):
    """The library says resume('/path'); under the CLI the same error says `python run_search.py resume PATH`."""
    (tmp_path / "results" / "taken").mkdir(parents=True)
    rc = cli.main(["search", str(REPO / "search_spaces" / "gmean.yaml"), "--dataset", "digits", "--rho", "10",
                   "--backbone", "identity", "--name", "taken", "--storage", str(tmp_path / "results"), "-q"])
    err = capsys.readouterr().err
    path = tmp_path / "results" / "taken"
    assert rc == 1 and f"`python run_search.py resume {path}`" in err and "another --name" in err
    assert "resume(" not in err
    assert cli.cli_text("Pass features= to resume.") != "Pass features= to resume."


# -- the repository's own documentation ---------------------------------------------------------------------


def test_no_reference_to_a_file_the_repository_does_not_have():
    texts = {p: p.read_text(encoding="utf-8") for folder in ("selmix_ray", "tests", "benchmarks", "docs")
             for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".md")}
    texts[REPO / "README.md"] = (REPO / "README.md").read_text(encoding="utf-8")
    spec = [str(p.relative_to(REPO)) for p, text in texts.items() if "SPEC" + ".md" in text]
    assert spec == []
    # every "docs/<page>.md, <Section>" reference names a heading of that page
    headings = {page.name: {h.strip() for h in re.findall(r"^#+ (.+)$", page.read_text(), re.M)}
                for page in (REPO / "docs").glob("*.md")}
    broken, seen = [], 0
    for path, text in texts.items():
        for page, cited in re.findall(r"docs/(\w+\.md)(?:, | \()([^);:\n\"]+)", text):
            seen += 1
            cited = cited.strip()
            known = headings.get(page, set())
            if not (any(cited.startswith(h) or h.startswith(cited) for h in known)
                    or all(part in known for part in cited.split(" and "))):
                broken.append(f"{path.name}: docs/{page}, {cited}")
    assert broken == [] and seen > 30


def test_the_journal_reader_agrees_with_optuna(tmp_path):
    """Run.df reads the links from the journal without Optuna; Optuna itself is the reference: two studies
    in one journal, interleaved trials, a trial without a link, and a half-written last line."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from selmix_ray.tune_adapter import read_journal_trial_links

    path = tmp_path / "journal.log"
    storage = JournalStorage(JournalFileBackend(str(path)))
    a = optuna.create_study(study_name="a", storage=storage)
    b = optuna.create_study(study_name="b", storage=storage)
    for i in range(7):
        study = a if i % 3 else b
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        if i != 4:
            trial.set_user_attr("tune_trial_id", f"t{i}")
        study.tell(trial, 0.5)
    with path.open("a") as journal:
        journal.write('{"op_code": 8, "trial_id": 0, "user_a')  # cut off mid-line
    for name in ("a", "b"):
        expected = {t.user_attrs["tune_trial_id"]: t.number for t in optuna.load_study(
            study_name=name, storage=JournalStorage(JournalFileBackend(str(path)))).trials
            if "tune_trial_id" in t.user_attrs}
        assert read_journal_trial_links(path, name) == expected and expected
    assert read_journal_trial_links(path, "c") == {}  # two studies, none named c


# -- real sweeps (Ray) --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_optuna_trials_carry_their_tune_trial_ids_read_with_plain_optuna(sweep):
    """README: the linked Optuna study, loaded with Optuna alone."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from selmix_ray.results import load_run

    storage = JournalStorage(JournalFileBackend(str(sweep / "optuna_journal.log")))
    study = optuna.load_study(study_name="single", storage=storage)
    linked = {t.user_attrs["tune_trial_id"]: t.number for t in study.trials}
    df = load_run(sweep).df
    assert len(linked) == len(df) == 8
    assert dict(zip(df["trial_id"], df["optuna_trial"].astype(int))) == linked
    run = load_run(sweep)
    assert [t.number for t in run.study.trials] == [t.number for t in study.trials]
    by_number = {t.number: t for t in study.trials}
    for _, row in df.iterrows():  # the linked trials agree on what was sampled and how it ended
        ot = by_number[int(row["optuna_trial"])]
        assert ot.params["method"] == row["config/method"] and ot.params["lr"] == row["config/lr"]
        assert ot.state.name == {"complete": "COMPLETE", "pruned": "PRUNED"}[row["status"]]


@pytest.mark.slow
def test_an_experiment_made_before_the_link_still_loads_with_nan_optuna_trial(sweep, tmp_path):
    import shutil

    from selmix_ray.results import load_run

    old = tmp_path / "single"
    shutil.copytree(sweep, old)
    lines = (old / "optuna_journal.log").read_text().splitlines()
    kept = [line for line in lines if "tune_trial_id" not in line]
    assert len(kept) < len(lines)
    (old / "optuna_journal.log").write_text("\n".join(kept) + "\n")
    df = load_run(old).df
    assert len(df) == 8 and df["optuna_trial"].isna().all()


@pytest.mark.slow
def test_result_grid_and_tensorboard_files(sweep):
    """README: Tune's ResultGrid of an experiment; TensorBoard event files are written by default."""
    from selmix_ray.results import load_run

    run = load_run(sweep)
    grid = run.result_grid()
    assert sorted(r.metrics["trial_id"] for r in grid) == sorted(run.df["trial_id"])
    scores = {r.metrics["trial_id"]: r.metrics["val/best_objective"] for r in grid}
    assert scores == dict(zip(run.df["trial_id"], run.df["val/best_objective"]))
    best = grid.get_best_result(metric="val/best_objective", mode="max")
    assert best.metrics["val/best_objective"] == run.best["val/best_objective"]
    assert len(grid.get_dataframe()) == len(run.df)
    for folder in run.trial_dirs.values():
        (events,) = folder.glob("events.out.tfevents.*")
        assert b"val/objective" in events.read_bytes()


@pytest.mark.slow
def test_search_with_a_callback_and_a_stop_rule(ray_cluster, digits, tmp_path):
    """README: a user's Tune callback sees every result; ``stop`` ends trials early (told PRUNED)."""
    from ray.tune import Callback

    from selmix_ray.sweep import search

    class Seen(Callback):
        def __init__(self):
            self.steps = []

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.steps.append((trial.trial_id, result["step"]))

    seen = Seen()
    space = {**SWEEP_SPACE, "fixed": {"steps": 60, "eval_every": 10}}
    run = search(space, features=digits, storage=tmp_path, name="stopped", num_samples=3, max_concurrent=2,
                 scheduler="fifo", callbacks=[seen, "tensorboard"], stop={"step": 20}, time_budget_s=600)
    assert set(run.df["steps_reached"]) == {20} and set(run.df["status"]) == {"pruned"}
    assert sorted(seen.steps) == sorted((t, s) for t in run.df["trial_id"] for s in (0, 10, 20))
    assert {t.state.name for t in run.study.trials} == {"PRUNED"}


@pytest.mark.slow
def test_cli_time_budget_stops_the_sweep_and_says_how_to_continue(ray_cluster, tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    storage = tmp_path / "results"
    command = [sys.executable, str(REPO / "run_search.py"), "search", str(REPO / "search_spaces" / "gmean.yaml"),
               "--dataset", "digits", "--rho", "10", "--backbone", "identity", "--num-samples", "50",
               "--name", "budget", "--storage", str(storage), "--max-concurrent", "1", "--scheduler", "fifo",
               "--address", ray_cluster, "--time-budget", "8", "steps=400", "eval_every=100"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "the time budget of 8 s ran out" in done.stdout
    assert f"continue with: python run_search.py resume {storage / 'budget'}" in done.stdout
    started = json.loads((storage / "budget" / "selmix_run.json").read_text())["num_samples"]
    assert started == 50 and len(list((storage / "budget").glob("run_trial_*"))) < 50


@pytest.mark.slow
def test_compare_table_shows_the_test_value_of_its_objective(sweep):
    """Scored by gmean, the table has a "test gmean" column (the test value at the best report by gmean)."""
    from selmix_ray.comparison import compare

    comparison = compare([sweep], objective="gmean")
    text = comparison.to_string(top=3)
    header = next(line for line in text.splitlines() if line.lstrip().startswith("name"))
    assert "test gmean" in header
    best = comparison.best["single"]
    assert f"{best['test_at_best/gmean']:.4f}" in text
    assert "test gmean" not in compare([sweep]).to_string(top=3)  # min_recall: already shown


@pytest.mark.slow
def test_trial_counter_after_resume_counts_the_trials_finished_before(ray_cluster, tmp_path):
    """Interrupted after its first trial, then resumed: the resumed run ends at "trial 4/4" (not 3/4)."""
    import signal
    import time

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    storage, experiment = tmp_path / "results", tmp_path / "results" / "counted"
    command = [sys.executable, str(REPO / "run_search.py"), "search", str(REPO / "search_spaces" / "gmean.yaml"),
               "--dataset", "digits", "--rho", "10", "--backbone", "identity", "--num-samples", "4",
               "--name", "counted", "--storage", str(storage), "--max-concurrent", "1", "--scheduler", "fifo",
               "--address", ray_cluster, "steps=8000", "eval_every=1000"]  # a few seconds per trial
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    try:
        deadline = time.monotonic() + 600
        for line in child.stdout:  # the logger flushes each line, so they arrive as they are written
            lines.append(line)
            if line.startswith("[selmix-ray] trial 1/4 "):
                child.send_signal(signal.SIGINT)
                break
            assert time.monotonic() < deadline, "no trial finished in time"
        lines.extend(child.communicate(timeout=120)[0].splitlines())
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130, "".join(lines)[-3000:]
    done = subprocess.run([sys.executable, str(REPO / "run_search.py"), "resume", str(experiment),
                           "--address", ray_cluster], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    counters = re.findall(r"^\[selmix-ray\] trial (\d+)/4 ", done.stdout, re.M)
    assert counters and counters[-1] == "4" and "1" not in counters
