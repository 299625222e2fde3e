"""How sure is the winner (selmix_ray.confidence): intervals, P(beats the best baseline), verdicts and the
selection rule, on experiment folders written by hand (tests/_experiment_files.py) and on a real sweep.

Independent references: ``uncertainty.intervals`` on counts read straight from the trial's JSON files, a
slow per-image bootstrap written here (a loop over replicates, ``rng.choice`` of each class's images), the
Wilson formula by hand, and ``pairing.compare_predictions`` on the stored predictions.
"""

from __future__ import annotations

import json
from statistics import NormalDist

import numpy as np
import pytest
from _experiment_files import balanced_labels, predictions, write_experiment

from selmix_ray.comparison import compare
from selmix_ray.confidence import INTERVAL_COLUMNS, selection_rule
from selmix_ray.constants import HISTORY_FILE
from selmix_ray.errors import ConfigError
from selmix_ray.history import dense_counts
from selmix_ray.metrics import confusion_counts
from selmix_ray.objectives import get_objective
from selmix_ray.pairing import compare_predictions
from selmix_ray.results import load_run
from selmix_ray.uncertainty import intervals

K = 4
VAL = balanced_labels(K, 40, seed=0)
TEST = balanced_labels(K, 60, seed=1)
BASE = (predictions(VAL, 0.6, seed=1), predictions(TEST, 0.6, seed=2))


def _improved(base, labels, fraction, seed):
    """``base`` with ``fraction`` of its errors fixed (a trial that errs on a subset of the same images)."""
    out = base.copy()
    wrong = np.flatnonzero(out != labels)
    fixed = np.random.default_rng(seed).choice(wrong, size=int(fraction * wrong.size), replace=False)
    out[fixed] = labels[fixed]
    return out


def _experiment(path, trials, **options):
    return write_experiment(path, val_labels=VAL, test_labels=TEST, trials=trials,
                            baselines={"start": BASE, "weak": (predictions(VAL, 0.3, seed=9),
                                                               predictions(TEST, 0.3, seed=9))}, **options)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """Three trials, two reports each (the second better for a and c), paired with the baselines."""
    trials = {}
    for index, (trial_id, recall) in enumerate([("a", [0.9, 0.8, 0.95, 0.7]), ("b", 0.75), ("c", [0.5, 1, 1, 1])]):
        first = (predictions(VAL, 0.5, seed=10 + index), predictions(TEST, 0.5, seed=20 + index))
        second = (predictions(VAL, recall, seed=30 + index), predictions(TEST, recall, seed=40 + index))
        trials[trial_id] = [first, second]
    return _experiment(tmp_path_factory.mktemp("confidence") / "three", trials)


def _stored_counts(path, trial_id, split, objective=None):
    """(K, K) counts of the trial's selected report, read from its history.json without selmix_ray.results."""
    (history_file,) = path.glob(f"run_trial_{trial_id}_*/checkpoint_*/{HISTORY_FILE}")
    history = json.loads(history_file.read_text())
    records = history["records"]
    if objective is None:
        (record,) = [r for r in records if r["step"] == history["best_step"]]
    else:
        scorer = get_objective(objective)
        record = max(records, key=lambda r: scorer.value(dense_counts(r["val"]["counts"], K)))
    return dense_counts(record[split]["counts"], K)


@pytest.mark.parametrize("objective", [None, "gmean", "hmean", "mean_recall_min_coverage"])
def test_intervals_equal_uncertainty_on_the_stored_counts(three, objective):
    """None: the sweep's own min recall at the stored best report; a name: the report that objective re-ranks
    to (G-mean, H-mean, a coverage-constrained one)."""
    run = load_run(three)
    table = run.intervals(objective).set_index("trial_id")
    scorer = get_objective(objective or "min_recall")
    for trial_id in "abc":
        val, test = (_stored_counts(three, trial_id, split, objective) for split in ("val", "test"))
        val_interval = intervals({trial_id: val}, scorer)[trial_id]
        test_interval = intervals({f"test:{trial_id}": test}, scorer)[f"test:{trial_id}"]
        lcb = intervals({trial_id: val}, scorer, method="percentile")[trial_id].low
        row = table.loc[trial_id]
        assert (row["val/ci_low"], row["val/ci_high"]) == (val_interval.low, val_interval.high)
        assert (row["test_at_best/ci_low"], row["test_at_best/ci_high"]) == (test_interval.low, test_interval.high)
        assert row["val/lcb"] == lcb


def test_run_df_carries_the_columns_deterministically(three):
    df = load_run(three).df
    assert set(INTERVAL_COLUMNS) <= set(df.columns)
    assert df["paired"].tolist() == [True, True, True]
    assert (df["val/ci_low"] <= df["val/best_objective"]).all() and (df["val/best_objective"] <= df["val/ci_high"]).all()
    again = load_run(three).df
    assert again[list(INTERVAL_COLUMNS)].equals(df[list(INTERVAL_COLUMNS)])
    other = load_run(three).intervals(seed=1)
    assert not np.array_equal(other["val/ci_high"].to_numpy(), df["val/ci_high"].to_numpy())
    fast = load_run(three, intervals=False).df
    assert not set(INTERVAL_COLUMNS) & set(fast.columns)


def _slow_paired(labels, trial, baseline, objective, resamples, seed):
    """Per-image paired bootstrap by a loop: each replicate draws n_k images of class k with replacement."""
    rng = np.random.default_rng(seed)
    scorer = get_objective(objective)
    members = [np.flatnonzero(labels == k) for k in range(K)]
    diffs, trial_values = [], []
    for _ in range(resamples):
        images = np.concatenate([rng.choice(m, size=m.size, replace=True) for m in members])
        value = scorer.value(confusion_counts(labels[images], trial[images], K))
        trial_values.append(value)
        diffs.append(value - scorer.value(confusion_counts(labels[images], baseline[images], K)))
    diffs = np.asarray(diffs)
    return float(np.mean(diffs > 0) + 0.5 * np.mean(diffs == 0)), np.asarray(trial_values)


def test_paired_probability_and_interval_against_a_slow_per_image_bootstrap(tmp_path):
    """A trial that fixes some of the baseline's errors, on mean recall (percentile intervals)."""
    trial_val = _improved(BASE[0], VAL, 0.15, seed=3)
    path = _experiment(tmp_path / "slow", {"t": [(trial_val, _improved(BASE[1], TEST, 0.15, seed=4))]},
                       objective="mean_recall")
    row = load_run(path).intervals().iloc[0]
    assert row["paired"]
    # exactly what pairing.compare_predictions gives on the stored predictions (one draw shared by all trials)
    exact = compare_predictions(VAL, trial_val, BASE[0], get_objective("mean_recall"), n_classes=K)
    assert row["p_beats_baseline"] == exact.prob_better
    # and, within Monte Carlo error, what resampling images one by one gives
    slow_p, slow_values = _slow_paired(VAL, trial_val, BASE[0], "mean_recall", resamples=1500, seed=7)
    assert row["p_beats_baseline"] == pytest.approx(slow_p, abs=0.03)
    assert slow_p > 0.9  # the paired comparison sees the gain (unpaired it would not: see test_pairing)
    low, high = np.quantile(slow_values, [0.05, 0.95])
    assert (row["val/ci_low"], row["val/ci_high"]) == pytest.approx((low, high), abs=0.012)


def test_per_class_intervals_are_wilson_intervals_of_the_stored_recall(three):
    run = load_run(three)
    table = run.per_class(["a"], split="test", intervals=True)
    counts = _stored_counts(three, "a", "test")
    n, recall = counts.sum(axis=1), np.diag(counts) / counts.sum(axis=1)
    z = NormalDist().inv_cdf(0.95)
    centre = (recall + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * np.sqrt(recall * (1 - recall) / n + z**2 / (4 * n**2))
    np.testing.assert_allclose(table["a"], recall)
    np.testing.assert_allclose(table["a low"], np.clip(centre - half, 0, 1))
    np.testing.assert_allclose(table["a high"], np.clip(centre + half, 0, 1))


# -- verdicts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, trial", [
    ("better", lambda: (_improved(BASE[0], VAL, 0.8, 1), _improved(BASE[1], TEST, 0.8, 2))),
    ("indistinguishable", lambda: (_improved(BASE[0], VAL, 0.03, 1), _improved(BASE[1], TEST, 0.03, 2))),
    ("worse", lambda: (predictions(VAL, 0.35, seed=5), predictions(TEST, 0.35, seed=6))),
])
def test_the_verdicts_three_outcomes(tmp_path, kind, trial):
    path = _experiment(tmp_path / kind, {"t": [trial()]})
    verdicts = load_run(path).verdicts()
    assert [v.kind for v in verdicts.values()] == [kind, kind]
    line = str(verdicts["validation"])
    assert line.startswith(f"trial t is {'indistinguishable from' if kind == 'indistinguishable' else kind}")
    assert "start" in line and "paired resamples" in line and "P(better)" in line
    assert ("within noise" if kind == "indistinguishable" else "beyond noise") in line
    c = verdicts["validation"].comparison
    assert c.trial == pytest.approx(get_objective("min_recall").value(confusion_counts(VAL, trial()[0], K)))
    # the verdict's P(better) is the table's
    assert c.prob_better == load_run(path).df["p_beats_baseline"].item()
    shown = compare(path).to_string()
    assert f"verdict: {line}" in shown


def test_an_experiment_without_predictions_or_select_loads_unpaired_under_max(tmp_path):
    """What experiments written before per-image predictions and ``select`` hold."""
    path = _experiment(tmp_path / "old", {"t": [(_improved(BASE[0], VAL, 0.8, 1), BASE[1])]},
                       with_predictions=False)
    manifest = json.loads((path / "selmix_run.json").read_text())
    assert "select" not in manifest and selection_rule(manifest) == "max"
    run = load_run(path)
    assert run.select == "max" and run.df["paired"].tolist() == [False]
    assert 0.9 < run.df["p_beats_baseline"].item() <= 1
    assert "unpaired resamples" in str(run.verdicts()["validation"])


# -- selection rule ------------------------------------------------------------------------------------


def test_lcb_picks_the_trial_whose_worst_class_is_surer(tmp_path):
    """'even' has the higher min recall (all six classes at 0.84), 'lopsided' one class at 0.82 and the rest
    perfect: its minimum is the surer one, so its lower bound is higher."""
    labels = balanced_labels(6, 50, seed=0)
    trials = {"even": [(predictions(labels, 0.84, seed=1), predictions(labels, 0.84, seed=2))],
              "lopsided": [(predictions(labels, [0.82, 1, 1, 1, 1, 1], seed=3), predictions(labels, 0.8, seed=4))]}
    runs = {}
    for rule in (None, "lcb"):
        runs[rule] = load_run(write_experiment(tmp_path / str(rule), val_labels=labels, test_labels=labels,
                                               trials=trials, select=rule))
    assert runs[None].best["trial_id"] == "even" and runs["lcb"].best["trial_id"] == "lopsided"
    lcb = runs["lcb"].df.set_index("trial_id")["val/lcb"]
    assert lcb["lopsided"] > lcb["even"]
    # read under the other rule, and the rule in force is shown
    assert compare(tmp_path / "None", select="lcb").best["None"]["name"] == "lopsided"
    assert compare(tmp_path / "lcb", select="max").best["lcb"]["name"] == "even"
    assert "select: lcb" in compare(tmp_path / "lcb").to_string()
    assert load_run(tmp_path / "lcb", intervals=False).best["trial_id"] == "lopsided"
    assert compare(tmp_path / "lcb", intervals=False).best["lcb"]["name"] == "lopsided"  # the rule needs val/lcb
    assert compare(tmp_path / "None", select="lcb", intervals=False).best["None"]["name"] == "lopsided"
    with pytest.raises(ConfigError, match="select must be one of max, lcb"):
        compare(tmp_path / "lcb", select="median")


def test_select_round_trips_through_the_space_and_the_manifest(synthetic_features, tmp_path):
    from types import SimpleNamespace

    from selmix_ray.manifest import build_manifest
    from selmix_ray.space import load_space
    from selmix_ray.sweep import _load_space_checked

    features = synthetic_features()
    raw = {"objective": "min_recall", "select": "lcb", "space": {"lr": {"loguniform": [0.1, 1]}},
           "fixed": {"steps": 20, "eval_every": 10}}
    space = load_space(raw, features=features)
    assert space.select == "lcb" and load_space(space.to_dict(), features=features).select == "lcb"
    location = SimpleNamespace(storage=str(tmp_path))
    manifest = build_manifest(space, features, name="x", num_samples=1, max_concurrent=1, resources_per_trial=None,
                              scheduler="fifo", sampler="tpe", repeats=1, seed=0, location=location)
    assert selection_rule(json.loads(json.dumps(manifest))) == "lcb"
    # search(select=...) over the space's
    assert _load_space_checked({**raw, "select": "max"}, features, select="lcb").select == "lcb"
    assert _load_space_checked({k: v for k, v in raw.items() if k != "select"}, features).select == "max"
    with pytest.raises(ConfigError, match="select must be one of max, lcb"):
        load_space({**raw, "select": "best"}, features=features)
    with pytest.raises(ConfigError, match="select must be one of max, lcb"):
        _load_space_checked(raw, features, select="best")


# -- the CLI and a real sweep --------------------------------------------------------------------------


def test_cli_compare_shows_intervals_and_verdicts_unless_told_not_to(three, capsys):
    from selmix_ray.cli import main

    assert main(["compare", str(three), "--select", "lcb", "--per-class"]) == 0
    out = capsys.readouterr().out
    assert "select: lcb" in out and "val 90% CI" in out and "P(>base)" in out and "verdict: trial" in out
    assert "with 90% Wilson intervals" in out and "a low" in out
    assert main(["compare", str(three), "--no-intervals"]) == 0
    out = capsys.readouterr().out
    assert "90% CI" not in out and "verdict" not in out and "select: max" in out


def test_a_real_sweep_pairs_every_trial_and_gives_a_verdict(sweep):
    run = load_run(sweep)
    df = run.df.dropna(subset=["val/best_objective"])
    assert len(df) >= 2 and df["paired"].all()
    assert ((df["val/ci_low"] <= df["val/best_objective"] + 1e-12)
            & (df["val/best_objective"] <= df["val/ci_high"] + 1e-12)).all()
    assert set(run.verdicts()) == {"validation", "test"}


def test_the_demo_summary_line_carries_the_interval_and_p(three):
    from selmix_ray.cli import _best_line

    run = load_run(three)
    best = run.best
    line = _best_line(run, best)
    assert f"[90% CI {best['val/ci_low']:.3f}, {best['val/ci_high']:.3f}]" in line
    assert f"P(beats the best baseline) = {best['p_beats_baseline']:.2f} (paired)" in line
    assert "select: max" in line and "min_recall 90% CI [" in line
    bare = load_run(three, intervals=False)
    assert "CI" not in _best_line(bare, bare.df.iloc[0].to_dict())
