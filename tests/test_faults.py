"""Faults and misuse get one clear message (README, Faults and misuse; selmix_ray.faults and cluster):
an unreachable --address, resources no node has, a sweep whose every trial errored, bad CLI values, a
binary space file, a damaged journal or result.json."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selmix_ray import cli
from selmix_ray.errors import ConfigError, ExperimentError, SweepFailedError

REPO = Path(__file__).resolve().parents[1]
DIGITS = ["--dataset", "digits", "--rho", "10", "--backbone", "identity"]
TINY = {"objective": "min_recall", "space": {"lr": {"loguniform": [0.1, 10]}}, "fixed": {"steps": 20, "eval_every": 10}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_address_where_nothing_listens_fails_within_the_timeout(tmp_path):
    """Before: ray.init retried the GCS for more than 5 minutes. Now: exit 1 after --connect-timeout."""
    address = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    command = [sys.executable, str(REPO / "run_search.py"), "search", str(REPO / "search_spaces" / "gmean.yaml"),
               *DIGITS, "--storage", str(tmp_path / "results"), "--name", "x", "--address", address,
               "--connect-timeout", "3", "steps=20", "eval_every=10"]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"Nothing answers at the Ray address '{address}'" in done.stderr and "after 3 s" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "results" / "x").exists()
    print(f"refused after {time.monotonic() - started:.1f} s (imports and features included)")


@pytest.mark.parametrize("address", ["127.0.0.1", "ray://nohost", "http://h:port"])
def test_an_address_without_a_port_is_refused(address):
    from selmix_ray.cluster import wait_until_listening

    with pytest.raises(ExperimentError, match="is not 'auto', 'host:port'"):
        wait_until_listening(address, 1)


def test_resources_no_node_has_are_refused_before_anything_is_written(ray_cluster, digits, tmp_path):
    """The session cluster has 2 CPUs and no GPU: before, each of these waited forever with no trial."""
    from selmix_ray.sweep import search

    cases = [({"cpu": 1, "gpu": 1}, TINY, "needs CPU 1, GPU 1"),
             ({"cpu": 3}, TINY, "needs CPU 3"),
             ({"cpu": 1}, {**TINY, "fixed": {**TINY["fixed"], "device": "cuda:7"}}, "device='cuda:7'")]
    for index, (resources, space, expected) in enumerate(cases):
        with pytest.raises(ExperimentError, match="the nodes have: CPU 2|no node of the Ray cluster has a GPU") as info:
            search(space, features=digits, storage=tmp_path, name=f"r{index}", num_samples=1,
                   resources_per_trial=resources)
        assert expected in str(info.value)
        assert not (tmp_path / f"r{index}").exists()


@pytest.mark.slow
def test_a_sweep_whose_every_trial_errored_exits_1_with_the_first_error(ray_cluster, cache_home, digits, tmp_path,
                                                                        capsys):
    """Before: exit 0, the TrainingError buried in Ray's tracebacks. lr ~ 1e30 diverges in every trial
    (the baselines use the default lr, so they are fine)."""
    space = tmp_path / "diverge.yaml"
    space.write_text(json.dumps({"objective": "min_recall", "space": {"lr": {"loguniform": [1e30, 1e31]}},
                                 "fixed": {"steps": 20, "eval_every": 10, "lr_scale": "none"}}))
    rc = cli.main(["-q", "search", str(space), *DIGITS, "--storage", str(tmp_path), "--name", "diverge",
                   "--num-samples", "2", "--address", ray_cluster])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("error: Every trial of") and "(2 of 2)" in err
    assert "TrainingError: Training diverged" in err and "Traceback" not in err
    assert "error.txt" in err  # where the whole traceback is
    with pytest.raises(SweepFailedError):  # the API raises the same
        from selmix_ray.faults import raise_if_every_trial_failed
        from selmix_ray.results import load_run

        raise_if_every_trial_failed(load_run(tmp_path / "diverge"))


def test_validate_on_a_binary_file_is_one_clear_line(tmp_path, capsys):
    binary = tmp_path / "space.yaml"
    binary.write_bytes(bytes(range(256)) * 8)
    assert cli.main(["validate", str(binary)]) == 1
    out = capsys.readouterr().out
    assert "INVALID, 1 problem(s)" in out and "is not a text file" in out


@pytest.mark.parametrize("option, expected", [
    (["--cpus-per-trial", "0"], "resources_per_trial must ask for some resource"),
    (["--seed", "-1"], "seed must be an integer >= 0"),
])
def test_bad_sweep_values_are_one_clear_line(cache_home, digits, tmp_path, capsys, option, expected):
    rc = cli.main(["-q", "search", str(REPO / "search_spaces" / "gmean.yaml"), *DIGITS, "--storage",
                   str(tmp_path), "--name", "bad", *option, "steps=20", "eval_every=10"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and expected in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_search_refuses_resources_of_only_zeros(digits, tmp_path):
    from selmix_ray.sweep import search

    with pytest.raises(ConfigError, match="must ask for some resource"):
        search(TINY, features=digits, storage=tmp_path, name="z", num_samples=1,
               resources_per_trial={"cpu": 0, "gpu": 0})


def _copy(sweep, tmp_path) -> Path:
    return Path(shutil.copytree(sweep, tmp_path / sweep.name))


@pytest.mark.slow
def test_compare_importance_on_a_damaged_journal_is_one_clear_line(sweep, tmp_path, capsys):
    experiment = _copy(sweep, tmp_path)
    journal = experiment / "optuna_journal.log"
    journal.write_bytes(b"\x89PNG not a journal\n" + journal.read_bytes())
    assert cli.main(["-q", "compare", str(experiment), "--importance", "--no-intervals"]) == 1
    captured = capsys.readouterr()
    assert "== single" in captured.out  # the tables still print
    assert captured.err.startswith(f"error: {journal} is damaged") and "Traceback" not in captured.err


@pytest.mark.slow
def test_a_garbage_result_json_is_named_not_a_silent_nan(sweep, tmp_path, capsys, caplog):
    experiment = _copy(sweep, tmp_path)
    from selmix_ray.results import load_run

    before = load_run(experiment, intervals=False).df.set_index("trial_id")
    folder = sorted(experiment.glob("run_trial_*"))[0]
    damaged = folder / "result.json"
    damaged.write_bytes(b"\x00\xff garbage \x13\n" * 50)
    with caplog.at_level(logging.WARNING, logger="selmix_ray"):
        after = load_run(experiment, intervals=False).df.set_index("trial_id")
    assert f"{damaged} is damaged" in caplog.text
    problems = after["problem"].dropna()
    assert len(problems) == 1 and str(damaged) in problems.iloc[0]
    trial = problems.index[0]
    assert after.loc[trial, "val/best_objective"] != after.loc[trial, "val/best_objective"]  # NaN, but named
    others = after.index != trial
    assert after.loc[others, "val/best_objective"].equals(before.loc[after.index[others], "val/best_objective"])

    assert cli.main(["-q", "compare", str(experiment), "--no-intervals"]) == 0
    assert f"warning: {damaged} is damaged" in capsys.readouterr().out


def test_a_line_being_written_is_not_damage(tmp_path):
    from selmix_ray.faults import read_last_result

    (tmp_path / "result.json").write_bytes(b'{"step": 10}\n{"step": 2')
    assert read_last_result(tmp_path) == ({"step": 10}, None)
    (tmp_path / "result.json").write_bytes(b'{"st')
    assert read_last_result(tmp_path) == (None, None)
    (tmp_path / "result.json").write_bytes(b'{"step": 10}\nnot json\n')
    record, problem = read_last_result(tmp_path)
    assert record is None and "last complete line is not JSON" in problem


def test_the_first_exception_of_an_error_file_is_the_message(tmp_path):
    from selmix_ray.faults import trial_error_message

    (tmp_path / "error.txt").write_text(
        "Failure # 1 (occurred at 2026-12-06)\n\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=1, ip=10.0.0.1)\n"
        "Traceback (most recent call last):\n  File \"x.py\", line 3, in f\n    raise TrainingError(...)\n"
        "selmix_ray.errors.TrainingError: Training diverged at step 10.\n  Lower lr.\n")
    assert trial_error_message(tmp_path) == "TrainingError: Training diverged at step 10.\n  Lower lr."
    assert trial_error_message(tmp_path / "missing") is None


@pytest.mark.slow
def test_an_errored_trial_without_params_json_is_listed_not_left_out(sweep, tmp_path):
    """Seen in the multi-node test: a trial that fails as it starts on a dying node ends ERROR in Tune's
    snapshot with only error.txt in its folder. Before, load_run left it out (5 trials of 6)."""
    from selmix_ray.faults import raise_if_every_trial_failed
    from selmix_ray.results import load_run

    experiment = _copy(sweep, tmp_path)
    snapshot = sorted(experiment.glob("experiment_state-*.json"))[-1]
    state = json.loads(snapshot.read_text())
    trial = json.loads(state["trial_data"][0][0])
    trial["status"] = "ERROR"
    state["trial_data"][0][0] = json.dumps(trial)
    snapshot.write_text(json.dumps(state))
    folder = experiment / trial["relative_logdir"]
    for name in os.listdir(folder):
        shutil.rmtree(folder / name) if (folder / name).is_dir() else os.remove(folder / name)
    (folder / "error.txt").write_text("Failure # 1 (occurred at 2026-12-06_01-21-07)\nThe actor died unexpectedly "
                                      "before finishing this task.\nThe actor died because its node has died.\n")
    df = load_run(experiment, intervals=False).df.set_index("trial_id")
    assert len(df) == 8 and df.loc[trial["trial_id"], "status"] == "errored"
    assert "has no params.json" in df.loc[trial["trial_id"], "problem"] and "node has died" in df.loc[
        trial["trial_id"], "problem"]
    raise_if_every_trial_failed(load_run(experiment, intervals=False))  # 7 trials did not error: no raise
