"""Confidence for a whole experiment (selmix_ray/confidence.py): the interval columns of Run.df and compare
against a slow per-image bootstrap, P(beats the best baseline) paired and unpaired, the verdict, the
selection rule (space file, search(select=), manifest, Run.best, compare --select), per-class Wilson
intervals, and experiments written before any of it."""

from __future__ import annotations

import json
import shutil
from statistics import NormalDist

import numpy as np
import pytest

from selmix_ray.baselines import stored_labels
from selmix_ray.errors import ConfigError
from selmix_ray.space import load_space
from selmix_ray.verdicts import SELECTION_RULES

# -- per-image reference -----------------------------------------------------------------------------


def _slow_bootstrap(labels, predictions, metric, resamples, seed):
    """(B, len(predictions)) values of ``metric(recalls)`` for each model on the same images redrawn with
    replacement within each class, one Python loop per replicate."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    members = [np.flatnonzero(labels == k) for k in classes]
    out = np.empty((resamples, len(predictions)))
    for b in range(resamples):
        chosen = np.concatenate([rng.choice(m, size=m.size, replace=True) for m in members])
        for j, pred in enumerate(predictions):
            recalls = [np.mean(pred[chosen][labels[chosen] == k] == k) for k in classes]
            out[b, j] = metric(np.array(recalls))
    return out


def _row(df, trial_id):
    return df.loc[df["trial_id"] == trial_id].iloc[0]


# -- the space file and search options (no Ray) -----------------------------------------------------------


def test_select_in_a_space_file_round_trips_and_a_bad_rule_is_refused():
    raw = {"objective": "min_recall", "space": {"lr": {"loguniform": [0.1, 10]}}, "fixed": {"steps": 20, "eval_every": 10}}
    assert load_space(raw).select == "max"
    assert "select" not in load_space(raw).to_dict()  # spaces written before the key compare equal
    space = load_space({**raw, "select": "lcb"})
    assert space.select == "lcb"
    assert load_space(space.to_dict()).select == "lcb"
    with pytest.raises(ConfigError, match="select must be one of max, lcb"):
        load_space({**raw, "select": "median"})
    assert SELECTION_RULES == ("max", "lcb")  # space.py keeps its own copy of the names


def test_selection_rule_of_a_manifest():
    from selmix_ray.confidence import rank_key, selection_rule

    assert selection_rule({}) == "max"  # experiments written before the rule existed
    assert selection_rule({"select": "lcb"}) == "lcb"
    assert selection_rule({"space": {"select": "lcb"}}) == "lcb"
    assert rank_key("max") == "val/best_objective" and rank_key("lcb") == "val/lcb"
    with pytest.raises(ConfigError, match="select must be one of"):
        selection_rule({"select": "best"})


def test_wilson_intervals_of_per_class_recall_by_hand():
    from selmix_ray.uncertainty import recall_intervals

    counts = np.array([[16, 4], [1, 19]])
    z = NormalDist().inv_cdf(0.95)
    p, n = 0.8, 20
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert recall_intervals(counts)[0] == pytest.approx([centre - half, centre + half], abs=1e-12)
    assert recall_intervals(counts)[0] == pytest.approx([0.6217, 0.9069], abs=1e-4)  # z = 1.645: centre 0.7643, half 0.1426


# -- a real sweep ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_intervals_match_a_slow_per_image_bootstrap(sweep):
    """mean recall (percentile interval) and min recall (basic interval) on validation, from the trial's stored
    predictions redrawn image by image: the ends agree to bootstrap noise (B = 3000 vs 1500)."""
    from selmix_ray.results import load_run

    run = load_run(sweep)
    labels = stored_labels(json.loads((sweep / "baselines.json").read_text()), "val")
    trial_id = run.best["trial_id"]
    predictions = run.history(trial_id).val_predictions[0]
    for objective, method, tolerance in (("mean_recall", "percentile", 0.012), ("min_recall", "basic", 0.051)):
        ours = _row(run.intervals(objective, resamples=3000), trial_id)
        draws = _slow_bootstrap(labels, [predictions], getattr(np, "mean" if objective == "mean_recall" else "min"),
                                1500, seed=1)[:, 0]
        point = np.mean([np.mean(predictions[labels == k] == k) for k in np.unique(labels)]) \
            if objective == "mean_recall" else min(np.mean(predictions[labels == k] == k) for k in np.unique(labels))
        low, high = np.quantile(draws, [0.05, 0.95])
        if method == "basic":
            low, high = 2 * point - high, 2 * point - low
        assert ours["val/ci_low"] == pytest.approx(low, abs=tolerance), objective
        assert ours["val/ci_high"] == pytest.approx(high, abs=tolerance), objective
        assert ours["val/ci_low"] <= point <= ours["val/ci_high"] or method == "basic"


@pytest.mark.slow
def test_p_beats_baseline_matches_a_slow_paired_bootstrap(sweep):
    from selmix_ray.confidence import trial_intervals
    from selmix_ray.results import load_run

    run = load_run(sweep)
    raw = json.loads((sweep / "baselines.json").read_text())
    labels = stored_labels(raw, "val")
    table = trial_intervals(run, resamples=3000)  # the sweep's objective, min recall: paired at stored reports
    assert table["paired"].all()
    # the best baseline under min recall, worked out from its stored counts
    scores = {}
    for name, record in run.baselines.items():
        counts = np.zeros((10, 10))
        for r, c, v in record["val"]["counts"]:
            counts[r, c] += v
        scores[name] = np.min(np.diag(counts) / counts.sum(axis=1))
    baseline = next(n for n, v in scores.items() if v >= max(scores.values()) - 1e-9)  # ties: file order
    from selmix_ray.baselines import baseline_predictions

    base = baseline_predictions(run.baselines[baseline], "val")[0]
    for trial_id in list(table["trial_id"])[:3]:
        trial = run.history(trial_id).val_predictions[0]
        draws = _slow_bootstrap(labels, [trial, base], np.min, 1500, seed=2)
        difference = draws[:, 0] - draws[:, 1]
        point = _row(run.df, trial_id)["val/best_objective"] - scores[baseline]
        difference = 2 * point - difference  # min recall: the basic method reads the reflected draws
        tie = np.abs(difference) <= 1e-9
        expected = np.mean((difference > 0) & ~tie) + 0.5 * np.mean(tie)
        assert _row(table, trial_id)["p_beats_baseline"] == pytest.approx(expected, abs=0.04)


@pytest.mark.slow
def test_df_compare_and_verdict_agree_and_lcb_changes_the_winner(sweep, tmp_path, capsys):
    """A copy of the sweep whose lowest-lcb trial is given the highest val/best_objective: max picks it, lcb
    picks the highest val/lcb; compare, Run.best and the CLI follow the rule; the verdict speaks of the winner
    and classifies by its interval."""
    from selmix_ray import cli
    from selmix_ray.comparison import compare
    from selmix_ray.results import load_run

    copy = tmp_path / "single"
    shutil.copytree(sweep, copy)
    run = load_run(copy)
    df = run.df
    assert set(df.columns) >= {"val/ci_low", "val/ci_high", "val/lcb", "test_at_best/ci_low", "p_beats_baseline"}
    reported = df[df["val/lcb"].notna()]
    assert (reported["val/ci_low"] <= reported["val/ci_high"]).all()
    loser = reported.loc[reported["val/lcb"].idxmin(), "trial_id"]
    winner = reported.loc[reported["val/lcb"].idxmax(), "trial_id"]
    assert loser != winner
    result = next(p for p in copy.glob(f"*{loser}*/result.json"))
    lines = result.read_text().splitlines()
    last = json.loads(lines[-1].replace("NaN", "null"))
    last["val/best_objective"] = 1.5
    result.write_text("\n".join(lines[:-1] + [json.dumps(last)]) + "\n")

    assert load_run(copy).best["trial_id"] == loser  # the rule in force: max
    manifest = json.loads((copy / "selmix_run.json").read_text())
    (copy / "selmix_run.json").write_text(json.dumps({**manifest, "select": "lcb"}))
    run = load_run(copy)
    assert run.select == "lcb" and run.best["trial_id"] == winner
    assert compare(copy).best["single"]["name"] == winner
    assert compare(copy, select="max").best["single"]["name"] == loser

    verdicts = run.verdicts()
    assert set(verdicts) == {"validation", "test"}
    for v in verdicts.values():
        assert v.trial == f"trial {winner}"
        c = v.comparison
        assert v.kind == ("better" if c.low > 0 else "worse" if c.high < 0 else "indistinguishable")
        assert c.paired
    assert verdicts["validation"].comparison.trial == pytest.approx(_row(run.df, winner)["val/best_objective"])

    assert cli.main(["compare", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "select: lcb" in out and "verdict: trial " + winner in out and "90% CI" in out
    assert cli.main(["compare", str(copy), "--select", "max", "--no-intervals", "--per-class"]) == 0
    out = capsys.readouterr().out
    assert "select: max" in out and "verdict:" not in out and "90% CI" not in out


@pytest.mark.slow
def test_an_experiment_without_stored_predictions_compares_unpaired(sweep, tmp_path):
    from selmix_ray.confidence import trial_intervals
    from selmix_ray.results import load_run

    copy = tmp_path / "old"
    shutil.copytree(sweep, copy)
    raw = json.loads((copy / "baselines.json").read_text())
    for key in ("val_labels", "test_labels"):
        raw.pop(key)
    raw["format"] = 2
    (copy / "baselines.json").write_text(json.dumps(raw))
    table = trial_intervals(load_run(copy))
    assert not table["paired"].any() and table["p_beats_baseline"].between(0, 1).all()
    verdicts = load_run(copy).verdicts()
    assert not verdicts["validation"].comparison.paired


@pytest.mark.slow
def test_per_class_intervals_hold_each_recall(sweep):
    from selmix_ray.results import load_run

    run = load_run(sweep)
    table = run.per_class(top=2, intervals=True)
    for label in [c for c in table.columns if c.endswith(" low")]:
        name = label[: -len(" low")]
        assert (table[f"{name} low"] <= table[name] + 1e-12).all()
        assert (table[name] <= table[f"{name} high"] + 1e-12).all()


@pytest.mark.slow
def test_search_select_is_stored_in_the_manifest_and_followed(ray_cluster, digits, tmp_path):
    from conftest import SWEEP_SPACE

    from selmix_ray.sweep import search

    space = {**SWEEP_SPACE, "fixed": {"steps": 20, "eval_every": 10}}
    run = search(space, features=digits, storage=tmp_path, name="lcb", num_samples=2, max_concurrent=2, seed=3,
                 select="lcb", scheduler="fifo")
    manifest = json.loads((tmp_path / "lcb" / "selmix_run.json").read_text())
    assert manifest["select"] == "lcb" and manifest["space"]["select"] == "lcb"
    assert run.select == "lcb"
    assert run.best["trial_id"] == run.df.loc[run.df["val/lcb"].idxmax(), "trial_id"]
    with pytest.raises(ConfigError, match="select must be one of"):
        search(space, features=digits, storage=tmp_path, name="bad", num_samples=1, select="best")
    assert not (tmp_path / "bad").exists()
