"""The CLI (selmix_ray/cli.py, run as run_search.py): validate (no Ray), overrides, --help, and one real search -> compare round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from selmix_ray import cli as run_search  # noqa: E402
from selmix_ray.errors import ConfigError  # noqa: E402

SHIPPED = sorted((REPO / "search_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_validate_accepts_every_shipped_space(path, capsys):
    assert run_search.main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: OK" in out and "fixed:" in out


def test_validate_prints_every_problem_and_exits_1(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "objective: min_recall\n"
        "space:\n"
        "  lr: {uniform: [2, 1]}\n"
        "  steps: {int: [10, 20]}\n"
        "  colour: {choice: [red]}\n"
        "  s: {loguniform: [0.1, 10], when: {method: selmix}}\n"
        "fixed:\n"
        "  eval_every: 50\n"
    )
    assert run_search.main(["validate", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "INVALID, 4 problem(s)" in out
    for fragment in ("space.lr", "space.steps", "space.colour", "when.method"):
        assert fragment in out
    assert run_search.main(["validate", str(tmp_path / "missing.yaml")]) == 1
    assert "does not exist" in capsys.readouterr().out


def test_validate_with_overrides(capsys):
    space = str(REPO / "search_spaces" / "min_recall.yaml")
    assert run_search.main(["validate", space, "steps=1000", "lr={loguniform: [0.3, 3]}", "objective=gmean"]) == 0
    out = capsys.readouterr().out
    assert "objective: gmean" in out and '"steps": 1000' in out and "[0.3, 3.0]" in out
    assert run_search.main(["validate", space, "steps=1001"]) == 1
    assert "multiple of eval_every" in capsys.readouterr().out


def test_apply_overrides_rules():
    raw = {"objective": "min_recall", "space": {"s": {"loguniform": [0.1, 10]}}, "fixed": {"steps": 100}}
    out = run_search.apply_overrides(raw, ["s=5", "lr={uniform: [0.5, 2]}", "weight_decay=1e-3",
                                           "objective_params={omega: 20}", "objectives=[min_recall, gmean]"])
    assert out["space"] == {"lr": {"uniform": [0.5, 2]}}
    assert out["fixed"] == {"steps": 100, "s": 5, "weight_decay": 1e-3, "objective_params": {"omega": 20}}
    assert out["objectives"] == ["min_recall", "gmean"] and "objective" not in out
    assert raw["space"] == {"s": {"loguniform": [0.1, 10]}}  # the input is not modified
    with pytest.raises(ConfigError) as info:
        run_search.apply_overrides(raw, ["nonsense", "=3"])
    assert len(info.value.problems) == 2


def test_help_explains_every_option():
    parser = run_search.build_parser()
    for command in ("search", "resume", "compare", "validate"):
        sub = parser._subparsers._group_actions[0].choices[command]
        for action in sub._actions:
            assert action.help, f"{command}: {action.dest} has no help"
    done = subprocess.run([sys.executable, str(REPO / "run_search.py"), "search", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0
    for option in ("--dataset", "--rho", "--backbone", "--num-samples", "--name", "--storage", "--max-concurrent",
                   "--repeats", "--seed", "--address", "--cut", "--checkpoint-every", "key=value"):
        assert option in done.stdout


def test_validate_starts_no_ray_and_main_sets_quiet_env():
    code = (
        "import json, os, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from selmix_ray import cli as run_search\n"
        "before = {k: os.environ.get(k) for k in run_search.QUIET_RAY_ENV}\n"
        f"rc = run_search.main(['validate', {str(SHIPPED[0])!r}])\n"
        "after = {k: os.environ.get(k) for k in run_search.QUIET_RAY_ENV}\n"
        "print(json.dumps([rc, 'ray' in sys.modules, 'optuna' in sys.modules, before, after]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in run_search.QUIET_RAY_ENV}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    rc, ray_loaded, optuna_loaded, before, after = json.loads(done.stdout.splitlines()[-1])
    assert rc == 0 and not ray_loaded and not optuna_loaded
    assert all(v is None for v in before.values())  # importing run_search set nothing
    assert after == run_search.QUIET_RAY_ENV


def test_cut_reaches_feature_building(tmp_path, capsys):
    """--cut block is handed to build_features, which refuses it for a backbone without a last block."""
    space = str(REPO / "search_spaces" / "min_recall_block.yaml")
    rc = run_search.main(["search", space, "--dataset", "digits", "--backbone", "identity", "--cut", "block",
                          "--cache-dir", str(tmp_path / "cache"), "--storage", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert rc == 1 and "cut='block' needs a backbone with a last block" in err and "Traceback" not in err
    assert not (tmp_path / "results").exists()  # refused before any sweep started


def test_compare_on_a_foreign_directory_is_one_clear_error(tmp_path, capsys):
    assert run_search.main(["compare", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a selmix-ray experiment" in err and "Traceback" not in err


@pytest.mark.slow
def test_search_then_compare_round_trip(ray_cluster, tmp_path):
    """The CLI's search on a real (small) sweep, then compare with re-ranking and plots."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    storage = tmp_path / "results"
    command = [sys.executable, str(REPO / "run_search.py"), "search", str(REPO / "search_spaces" / "gmean.yaml"),
               "--dataset", "digits", "--rho", "10", "--backbone", "identity", "--num-samples", "3",
               "--name", "cli", "--storage", str(storage), "--max-concurrent", "2", "--address", ray_cluster,
               "steps=20", "eval_every=10"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "best trial" in out and "baselines:" in out and f"plots written to {storage / 'cli' / 'plots'}" in out
    assert "verdict: trial" in out and "select: max" in out and "[90% CI" in out  # how sure the winner is
    assert (storage / "cli" / "plots" / "history.png").stat().st_size > 0
    assert "cutmix" not in json.loads((storage / "cli" / "selmix_run.json").read_text())["space"]["space"]["mixup"][
        "choice"]  # digits features have no maps

    plots = tmp_path / "plots"
    done = subprocess.run([sys.executable, str(REPO / "run_search.py"), "compare", str(storage / "cli"),
                           "--objective", "min_recall", "--top", "2", "--plots", str(plots), "--per-class"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "val/best_min_recall" in done.stdout and "band" in done.stdout
    assert (plots / "history.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_ctrl_c_leaves_a_resumable_experiment_that_resume_completes(ray_cluster, cache_home, digits, tmp_path):
    """SIGINT mid-sweep: exit 130 with the resume command; `resume` then ends with every trial finished.

    SIGINT goes at the first report (step 0) of the first of 8 trials run one at a time, so 7 trials'
    start-up and 16000 steps each remain. Tune does not always act on SIGINT at once: with 4 trials of
    2000 or 16000 steps (a few seconds each on an idle machine) the sweep sometimes finished first and
    exited 0. The features come from the session's cache (digits fixture); the baselines run the same steps.
    """
    import signal
    import time

    from selmix_ray.results import load_run

    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    storage, num_samples = tmp_path / "results", 8
    experiment = storage / "ctrlc"
    command = [sys.executable, str(REPO / "run_search.py"), "search", str(REPO / "search_spaces" / "gmean.yaml"),
               "--dataset", "digits", "--rho", "10", "--backbone", "identity", "--num-samples", str(num_samples),
               "--name", "ctrlc", "--storage", str(storage), "--max-concurrent", "1", "--scheduler", "fifo",
               "--address", ray_cluster, "steps=16000", "eval_every=4000"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 600  # only a broken sweep waits this long
        while not any(p.stat().st_size > 0 for p in experiment.glob("run_trial_*/result.json")):
            assert child.poll() is None, child.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no trial reported in time"
            time.sleep(0.2)
        child.send_signal(signal.SIGINT)
        out, _ = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130, out[-3000:]
    assert "sweep stopped after" in out and "sweep finished" not in out
    assert f"resume it with: python run_search.py resume {experiment}" in out
    assert len(load_run(experiment).df) < num_samples or "running" in set(load_run(experiment).df["status"])

    done = subprocess.run([sys.executable, str(REPO / "run_search.py"), "resume", str(experiment),
                           "--address", ray_cluster], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    df = load_run(experiment).df
    assert len(df) == num_samples and set(df["status"]) == {"complete"}


def test_run_search_without_dependencies_says_how_to_set_up(tmp_path):
    """A Python that lacks the dependencies gets one line naming the fix, not a traceback."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # -S: no site-packages, so the package imports (from the checkout) but yaml, numpy and Ray are missing
    done = subprocess.run([sys.executable, "-S", str(REPO / "run_search.py"), "validate", str(SHIPPED[0])],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "make demo" in done.stderr and ".venv/bin/python run_search.py" in done.stderr
