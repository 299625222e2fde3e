"""How sure is the winner? Intervals, P(beats the best baseline), the selection rule and the verdict for a Run.

The statistics live in :mod:`selmix_ray.uncertainty` (per-class bootstrap from stored counts),
:mod:`selmix_ray.verdicts` (comparisons, verdicts, rules) and :mod:`selmix_ray.pairing` (paired on stored
per-image predictions); this module applies them to a loaded experiment, for the tables (``Run.df``,
``compare``), ``per_class``, the history plot and the end-of-sweep summary. numpy and pandas only.

    table = trial_intervals(run)            # one row per trial: val/test intervals, val/lcb, P(better)
    line = str(best_verdict(run))           # "trial ... is better than start+class_weights beyond noise: ..."

Decisions (not settled elsewhere)
    - What is resampled: a trial's counts at its selected report (``best_step``, the report
      ``val/best_objective`` and ``test_at_best/*`` come from), summed over repeat copies (``repeats`` of
      :func:`~selmix_ray.uncertainty.resample`); the point value is the objective of those pooled counts
      (equal to ``val/best_objective`` without repeats). Under a re-ranking objective the selected report
      is the one :meth:`Run.rerank` picks.
    - Columns (all at level 0.90, B = 1000, seed 0): ``val/ci_low``, ``val/ci_high`` and
      ``test_at_best/ci_low``, ``test_at_best/ci_high`` (the confidence interval of the objective, method
      "auto" of :func:`~selmix_ray.uncertainty.interval`); ``val/lcb`` (the lower end of the percentile
      interval from the same validation replicates: the score of the ``lcb`` rule); ``p_beats_baseline``
      (P(trial > best baseline) on validation) and ``paired`` (True: from per-image predictions on the same
      resampled images; False: the two resampled independently from counts, for experiments older than
      stored predictions or a re-ranked report other than the stored one).
    - Streams: every trial and baseline draws from its own streams derived from the seed and its name
      (validation: the trial id, test: ``"test:<id>"``, as :func:`~selmix_ray.uncertainty.intervals`), so a
      trial's interval does not change when other trials join the table; its validation interval, its
      ``val/lcb`` and its unpaired P(better) come from the same replicates. Paired comparisons draw the
      images from the seed itself, once for every trial (what ``pairing.compare_predictions`` draws with
      that seed, so the table's P(better) and the verdict's are the same number).
    - The selection rule (``select`` in the space file or ``search(select=...)``, stored in the manifest;
      experiments without one use ``"max"``): ``"max"`` ranks by ``val/best_objective`` (the highest point
      value), ``"lcb"`` by ``val/lcb``. It decides ``Run.best``, the order of every table and the trial the
      verdict speaks of. Inside the sweep, ASHA and Optuna keep seeing the point value ``val/best_objective``:
      a trial's bootstrap is meaningful only against other trials, and resampling every report of every trial
      would cost far more than the report itself at K = 1000; the rule applies where a winner is chosen.
    - The best baseline: the highest value of the objective on its stored validation counts (values within
      1e-9 are ties, and the first in ``baselines.json`` wins them).
    - The verdict compares the selected trial with the best baseline on
      validation, the split a user may choose on, and adds the same comparison on test. The validation
      verdict is optimistic for the winner of many trials (it is the best of them); the test line is the
      unbiased check, and the README's quality section measures how often the two agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from .baselines import _find_split, baseline_predictions, stored_labels
from .constants import BASELINES_FILE, SCORE_KEY
from .errors import ConfigError, ExperimentError
from .history import dense_counts
from .metrics import joint_confusion
from .objectives import Objective, get_objective
from .pairing import check_predictions, compare_predictions, pooled_replicates
from .uncertainty import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    _bounds,
    _needs_columns,
    _resolve_method,
    _streams,
    _vectorised,
    bootstrap,
    recall_intervals,
    replicate_values,
)
from .verdicts import SELECTION_RULES, TIE_TOLERANCE, Comparison, Verdict, verdict

__all__ = ["INTERVAL_COLUMNS", "selection_rule", "check_rule", "trial_intervals", "baseline_intervals",
           "best_verdicts", "per_class_intervals", "rank_key", "join_intervals"]

INTERVAL_COLUMNS = ("val/ci_low", "val/ci_high", "val/lcb", "test_at_best/ci_low", "test_at_best/ci_high",
                    "p_beats_baseline", "paired")
RANK_KEYS = {"max": SCORE_KEY, "lcb": "val/lcb"}


def check_rule(rule) -> str:
    """``rule`` if it is a selection rule, else a ConfigError that lists them."""
    if rule not in SELECTION_RULES:
        raise ConfigError(f"select must be one of {', '.join(SELECTION_RULES)} (max: highest validation value; "
                          f"lcb: highest lower confidence bound), but got {rule!r}.")
    return rule


def selection_rule(manifest: dict[str, Any]) -> str:
    """The rule an experiment selects by: the manifest's ``select`` (or its space's), else ``"max"``."""
    space = manifest.get("space") or {}
    return check_rule(manifest.get("select") or space.get("select") or "max")


def rank_key(rule: str) -> str:
    """The column the rule ranks trials by (higher is better)."""
    return RANK_KEYS[check_rule(rule)]


@dataclass
class _Context:
    """What every trial's computation shares: the scorer, the best baseline and its replicates."""

    scorer: Objective
    objective: str
    own: bool  # the sweep's own objective: the stored best report (and predictions) apply
    level: float
    resamples: int
    seed: int
    labels: np.ndarray | None
    baseline: str | None
    baseline_counts: np.ndarray | None
    baseline_predictions: np.ndarray | None
    baseline_draws: np.ndarray | None
    baseline_repeats: int


def _baselines_file(run) -> dict[str, Any]:
    path = run.path / BASELINES_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ExperimentError(f"{path} is unreadable: {error}. Move it away to read the trials without "
                              "baselines.") from error
    return data if isinstance(data, dict) else {}


def _scorer(run, objective: str | None) -> tuple[Objective, str, bool]:
    name = objective or run.objective
    own = name == run.objective
    params = run.objective_params if own else {}
    return get_objective(name, train_counts=run.train_counts(), **params), name, own


def _baseline_counts(record: dict[str, Any], split: str, K: int) -> np.ndarray | None:
    part = _find_split(record, split)
    if part is None or "counts" not in part:
        return None
    return dense_counts(part["counts"], K)


def _baseline_score(record, scorer, K) -> float | None:
    counts = _baseline_counts(record, "val", K)
    return None if counts is None else float(scorer.value(joint_confusion(counts)))


def _context(run, objective, level, resamples, seed, K) -> _Context:
    scorer, name, own = _scorer(run, objective)
    data = _baselines_file(run)
    repeats = int(data.get("repeats") or 1)
    scores = {n: _baseline_score(r, scorer, K) for n, r in run.baselines.items()}
    scores = {n: s for n, s in scores.items() if s is not None}
    top = max(scores.values(), default=None)  # ties within rounding: the first in file order
    baseline = next((n for n, v in scores.items() if v >= top - TIE_TOLERANCE), None) if scores else None
    counts = predictions = draws = None
    if baseline is not None:
        record = run.baselines[baseline]
        counts = _baseline_counts(record, "val", K)
        predictions = baseline_predictions(record, "val")
        (stream,) = _streams(seed, [f"baseline:{baseline}"])
        draws = bootstrap(counts, scorer, resamples=resamples, seed=stream, repeats=repeats)
    return _Context(scorer=scorer, objective=name, own=own, level=level, resamples=resamples, seed=seed,
                    labels=stored_labels(data, "val"), baseline=baseline, baseline_counts=counts,
                    baseline_predictions=predictions, baseline_draws=draws, baseline_repeats=repeats)


def _selected_indices(history, ctx: _Context) -> list[int]:
    """The report index each copy is judged at: its stored best report, or the re-ranked one."""
    if ctx.own:
        return [copy.best_index() for copy in history.copies]
    values = [np.mean([ctx.scorer.value(joint_confusion(history.confusion(i, "val", c)))
                       for c in range(len(history.copies))]) for i in range(len(history.steps))]
    return [int(np.argmax(values))] * len(history.copies)


def _pooled(history, indices: list[int], split: str) -> np.ndarray:
    return np.sum([history.confusion(i, split, c) for c, i in enumerate(indices)], axis=0)


def _paired_possible(history, indices, ctx: _Context, split: str) -> bool:
    return (ctx.labels is not None and ctx.baseline_predictions is not None
            and getattr(history, f"{split}_predictions") is not None
            and indices == [copy.best_index() for copy in history.copies])


def _trial_row(trial_id: str, history, indices: list[int], ctx: _Context, paired=None) -> dict[str, Any]:
    """The trial's confidence columns; ``paired``: its and the baseline's validation replicate values on the
    same resampled images (:func:`_paired_values`), None for an unpaired P(better)."""
    repeats = len(indices)
    method = _resolve_method("auto", ctx.scorer)
    row: dict[str, Any] = {"trial_id": trial_id}
    val = _pooled(history, indices, "val")
    val_point = float(ctx.scorer.value(joint_confusion(val)))
    (val_stream, test_stream) = _streams(ctx.seed, [trial_id, f"test:{trial_id}"])
    val_draws = bootstrap(val, ctx.scorer, resamples=ctx.resamples, seed=val_stream, repeats=repeats)
    row["val/ci_low"], row["val/ci_high"] = _bounds(val_point, val_draws, ctx.level, method)
    row["val/lcb"] = _bounds(val_point, val_draws, ctx.level, "percentile")[0]
    test = _pooled(history, indices, "test")
    test_point = float(ctx.scorer.value(joint_confusion(test)))
    test_draws = bootstrap(test, ctx.scorer, resamples=ctx.resamples, seed=test_stream, repeats=repeats)
    row["test_at_best/ci_low"], row["test_at_best/ci_high"] = _bounds(test_point, test_draws, ctx.level, method)
    row["p_beats_baseline"], row["paired"] = np.nan, None
    if ctx.baseline is not None:
        baseline_point = float(ctx.scorer.value(joint_confusion(ctx.baseline_counts)))
        trial_draws, baseline_draws = paired if paired is not None else (val_draws, ctx.baseline_draws)
        comparison = Comparison.from_draws(val_point, baseline_point, trial_draws, baseline_draws, level=ctx.level,
                                           method=method, paired=paired is not None)
        row["p_beats_baseline"], row["paired"] = comparison.prob_better, comparison.paired
    return row


_BASELINE_KEY = ("baseline",)  # never a trial id (those are strings)
_PAIRED_CHUNK = 32  # trials resampled together: the same images each time (same seed), bounded memory


def _paired_values(histories: dict, selected: dict[str, list[int]], ctx: _Context) -> dict[str, tuple]:
    """trial id -> (trial, baseline) (B,) validation replicate values, paired on the same resampled images,
    for every trial whose stored predictions allow it. One image draw serves every trial (the draws of
    :func:`~selmix_ray.pairing.compare_predictions` with the same seed, so the numbers equal it and the
    verdict's); only the tally is per trial."""
    eligible = {}
    for trial_id, history in histories.items():
        if _paired_possible(history, selected[trial_id], ctx, "val"):
            trial = history.val_predictions
            check_predictions(ctx.labels, trial, [history.confusion(i, "val", c)
                                                  for c, i in enumerate(selected[trial_id])],
                              n_classes=history.n_classes, what=f"trial {trial_id}")
            eligible[trial_id] = trial
    out: dict[str, tuple] = {}
    ids = list(eligible)
    for start in range(0, len(ids), _PAIRED_CHUNK):
        chunk = {_BASELINE_KEY: ctx.baseline_predictions, **{t: eligible[t] for t in ids[start:start + _PAIRED_CHUNK]}}
        drawn = pooled_replicates(ctx.labels, chunk, n_classes=int(ctx.baseline_counts.shape[0]),
                                  resamples=ctx.resamples, seed=ctx.seed, columns=_needs_columns(ctx.scorer),
                                  full=not _vectorised(ctx.scorer))
        baseline = replicate_values(ctx.scorer, drawn.pop(_BASELINE_KEY))
        out.update({t: (replicate_values(ctx.scorer, r), baseline) for t, r in drawn.items()})
    return out


def _against_baseline(trial_id, history, indices, ctx: _Context, point=None, draws=None,
                      split: str = "val") -> Comparison | None:
    """The trial against the best baseline on ``split``: paired when predictions allow, else unpaired."""
    if ctx.baseline is None:
        return None
    if _paired_possible(history, indices, ctx, split):
        trial = getattr(history, f"{split}_predictions")
        check_predictions(ctx.labels, trial, [history.confusion(i, split, c) for c, i in enumerate(indices)],
                          n_classes=history.n_classes, what=f"trial {trial_id}")
        return compare_predictions(ctx.labels, trial, ctx.baseline_predictions, ctx.scorer,
                                   n_classes=history.n_classes, level=ctx.level, resamples=ctx.resamples,
                                   seed=ctx.seed)
    method = _resolve_method("auto", ctx.scorer)
    baseline_point = float(ctx.scorer.value(joint_confusion(ctx.baseline_counts)))
    return Comparison.from_draws(point, baseline_point, draws, ctx.baseline_draws, level=ctx.level,
                                 method=method, paired=False)


def trial_intervals(run, *, objective: str | None = None, level: float = DEFAULT_LEVEL,
                    resamples: int = DEFAULT_RESAMPLES, seed: int = 0):
    """pandas DataFrame, one row per trial with a history: ``trial_id`` and :data:`INTERVAL_COLUMNS`.

    Args:
        run: a :class:`~selmix_ray.results.Run`.
        objective: default the sweep's own (with its parameters); another name re-ranks (module docstring).
        level, resamples, seed: of every interval and comparison (deterministic given ``seed``).
    """
    import pandas as pd

    histories = {}
    for trial_id in run.trial_dirs:
        try:
            histories[trial_id] = run.history(trial_id)
        except ExperimentError:  # not reported yet: no interval, its row stays NaN
            continue
    if not histories:
        return pd.DataFrame(columns=["trial_id", *INTERVAL_COLUMNS])
    K = next(iter(histories.values())).n_classes
    ctx = _context(run, objective, level, resamples, seed, K)
    selected = {t: _selected_indices(h, ctx) for t, h in histories.items()}
    paired = _paired_values(histories, selected, ctx) if ctx.baseline is not None else {}
    rows = [_trial_row(t, h, selected[t], ctx, paired.get(t)) for t, h in histories.items()]
    return pd.DataFrame(rows, columns=["trial_id", *INTERVAL_COLUMNS])


def baseline_intervals(run, *, objective: str | None = None, level: float = DEFAULT_LEVEL,
                       resamples: int = DEFAULT_RESAMPLES, seed: int = 0):
    """pandas DataFrame, one row per baseline with stored counts: ``name``, the val/test interval columns."""
    import pandas as pd

    columns = ["name", "val/ci_low", "val/ci_high", "test_at_best/ci_low", "test_at_best/ci_high"]
    K = _n_classes(run)
    if K is None:
        return pd.DataFrame(columns=columns)
    scorer, _, _ = _scorer(run, objective)
    repeats = int(_baselines_file(run).get("repeats") or 1)
    method = _resolve_method("auto", scorer)
    rows = []
    for name, record in run.baselines.items():
        row: dict[str, Any] = {"name": name}
        for split, prefix in (("val", "val"), ("test", "test_at_best")):
            counts = _baseline_counts(record, split, K)
            if counts is None:
                row[f"{prefix}/ci_low"] = row[f"{prefix}/ci_high"] = np.nan
                continue
            (stream,) = _streams(seed, [f"baseline:{name}" if split == "val" else f"baseline-test:{name}"])
            draws = bootstrap(counts, scorer, resamples=resamples, seed=stream, repeats=repeats)
            point = float(scorer.value(joint_confusion(counts)))
            row[f"{prefix}/ci_low"], row[f"{prefix}/ci_high"] = _bounds(point, draws, level, method)
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def _n_classes(run) -> int | None:
    for record in run.baselines.values():
        if record.get("n_classes"):
            return int(record["n_classes"])
    for trial_id in run.trial_dirs:
        try:
            return run.history(trial_id).n_classes
        except ExperimentError:
            continue
    return None


def best_verdicts(run, trial_id: str | None = None, *, objective: str | None = None,
                  level: float = DEFAULT_LEVEL, resamples: int = DEFAULT_RESAMPLES,
                  seed: int = 0) -> dict[str, Verdict]:
    """{"validation": Verdict, "test": Verdict} of a trial (default: ``run.best`` under the run's rule)
    against the best baseline; {} when the run has no baseline or no trial with a history."""
    if trial_id is None:
        best = run.best
        if best is None:
            return {}
        trial_id = best["trial_id"]
    try:
        history = run.history(trial_id)
    except ExperimentError:
        return {}
    ctx = _context(run, objective, level, resamples, seed, history.n_classes)
    if ctx.baseline is None:
        return {}
    indices = _selected_indices(history, ctx)
    streams = _streams(seed, [trial_id, f"test:{trial_id}"])  # as the table's, so the numbers agree
    out = {}
    for stream, (split, label) in zip(streams, (("val", "validation"), ("test", "test"))):
        counts = _pooled(history, indices, split)
        point = float(ctx.scorer.value(joint_confusion(counts)))
        draws = bootstrap(counts, ctx.scorer, resamples=resamples, seed=stream, repeats=len(indices))
        if split == "test":
            ctx = _test_context(run, ctx, history.n_classes, _baselines_file(run))
        comparison = _against_baseline(trial_id, history, indices, ctx, point, draws, split=split)
        out[label] = verdict(comparison, trial=f"trial {trial_id}", baseline=ctx.baseline,
                             objective=ctx.objective, split=label)
    return out


def _test_context(run, ctx: _Context, K: int, data: dict[str, Any]) -> _Context:
    """The same best baseline (chosen on validation) on test: its test counts resampled from their own stream,
    its test predictions for a paired comparison."""
    record = run.baselines[ctx.baseline]
    counts = _baseline_counts(record, "test", K)
    (stream,) = _streams(ctx.seed, [f"baseline-test:{ctx.baseline}"])
    draws = bootstrap(counts, ctx.scorer, resamples=ctx.resamples, seed=stream, repeats=ctx.baseline_repeats)
    return _Context(**{**ctx.__dict__, "baseline_counts": counts, "baseline_draws": draws,
                       "labels": stored_labels(data, "test"), "baseline_predictions": baseline_predictions(record, "test")})


def per_class_intervals(run, label: str, split: str = "test", *, level: float = DEFAULT_LEVEL) -> np.ndarray:
    """(K, 2) Wilson intervals of each class's recall for a trial (at its best report, copies pooled) or a
    baseline (its stored counts)."""
    if label in run.baselines:
        record = run.baselines[label]
        K = _n_classes(run)
        counts = _baseline_counts(record, split, K) if K is not None else None
        if counts is None:
            raise ExperimentError(f"baseline {label!r} has no stored {split} counts for recall intervals.")
        return recall_intervals(counts, level=level, repeats=int(_baselines_file(run).get("repeats") or 1))
    history = run.history(label)
    indices = [copy.best_index() for copy in history.copies]
    return recall_intervals(_pooled(history, indices, split), level=level, repeats=len(indices))


def join_intervals(df, intervals):
    """``df`` with the confidence columns of ``intervals`` (NaN for trials without a history)."""
    df = df.copy()
    by_trial = intervals.set_index("trial_id")
    for column in by_trial.columns:
        df[column] = df["trial_id"].map(by_trial[column]) if len(df) else np.nan
    return df
