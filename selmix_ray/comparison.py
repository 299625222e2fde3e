"""Several experiments side by side: their trials and baselines in one table, scored by one objective.

    compare(["results/a", "results/b"], objective="gmean").to_string(top=10)

With ``objective=None`` each run is scored by its own ``val/best_objective``; with a name, every trial is
re-ranked from its stored confusion counts (no retraining) and every baseline scored from its stored values.

With ``intervals=True`` (the default) every row carries the 90% confidence interval of its score on
validation and on test, trials their ``val/lcb`` and P(beats the best baseline), and each run its verdict
(:mod:`selmix_ray.confidence`); trials are ranked by the selection rule (each run's own, or ``select``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .baselines import baseline_score
from .constants import SCORE_KEY
from .results import STATUSES, TEST_AT_BEST, Run, load_run

__all__ = ["Comparison", "compare"]


@dataclass
class Comparison:
    """Trials of several runs (and their baselines) scored by one objective. Build with :func:`compare`."""

    runs: list[Run]
    objective: str | None
    df: Any  # pandas DataFrame: run, kind (trial/baseline), name, status, score, test_at_best/*, config/*
    select: str | None = None  # the rule that ranks trials; None: each run's own (its manifest)
    verdicts: dict[str, list[str]] = field(default_factory=dict)  # run name -> verdict lines (intervals on)

    def rule(self, run: Run) -> str:
        return self.select or run.select

    def _rank_column(self, run: Run) -> str:
        return "score" if self.rule(run) == "max" or "val/lcb" not in self.df else "val/lcb"

    @property
    def table(self):
        import pyarrow as pa

        return pa.Table.from_pandas(self.df, preserve_index=False)

    @property
    def best(self) -> dict[str, dict[str, Any]]:
        """Best trial per run under the comparison's objective and selection rule: {run name: row}."""
        out = {}
        for run in self.runs:
            key = self._rank_column(run)
            trials = self.df[(self.df["run"] == run.name) & (self.df["kind"] == "trial") & self.df["score"].notna()
                             & self.df[key].notna()]
            if not trials.empty:
                out[run.name] = trials.loc[trials[key].idxmax()].to_dict()
        return out

    def to_string(self, *, top: int = 10) -> str:
        """A readable table: per run, the ``top`` trials by score, then its baselines."""
        import pandas as pd

        lines = []
        if "val/ci_low" in self.df:
            lines.append("90% CI: per-class bootstrap of the stored counts; val/lcb: the lcb rule's score; P(>base): "
                         "P(trial beats the best baseline on validation), p = paired on the same images, "
                         "u = unpaired from counts")
        show = ["name", "status", "steps_reached", "score", "test_at_best/min_recall", "test_at_best/mean_recall"]
        if "val/ci_low" in self.df:
            show[4:4] = ["val 90% CI", "val/lcb", "P(>base)"]
            show.insert(-2, "test 90% CI")
        with pd.option_context("display.width", 200, "display.max_columns", 30, "display.max_colwidth", 40,
                               "display.float_format", "{:.4f}".format):
            for run in self.runs:
                part = self.df[self.df["run"] == run.name]
                objective = self.objective or run.objective
                tested = [f"test_at_best/{objective}"] if f"test_at_best/{objective}" in part and \
                    f"test_at_best/{objective}" not in show else []  # e.g. a gmean sweep's test gmean
                part = _with_interval_text(part)
                trials = part[part["kind"] == "trial"].sort_values(self._rank_column(run), ascending=False,
                                                                   kind="stable")
                counts = trials["status"].value_counts().to_dict()
                summary = ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUSES)
                lines.append(f"== {run.name} ({run.path}) - score: val/best_{objective} - select: {self.rule(run)} - "
                             f"{len(trials)} trials: {summary}")
                config_columns = [c for c in trials.columns if c.startswith("config/")
                                  and trials[c].nunique(dropna=True) > 1]
                head = trials.head(top)[show + tested + config_columns].astype({"steps_reached": "Int64"}).rename(
                    columns=lambda c: c.replace("config/", "").replace("test_at_best/", "test "))
                lines.append(head.to_string(index=False) if not head.empty else "(no trial has reported yet)")
                if "problem" in trials:  # e.g. a damaged result.json (selmix_ray.faults)
                    lines.extend(f"warning: {problem}" for problem in trials["problem"].dropna())
                base = part[part["kind"] == "baseline"]
                if not base.empty:
                    lines.append("baselines:")
                    base_show = [c for c in show if c in base and c not in ("status", "steps_reached", "val/lcb",
                                                                             "P(>base)")]
                    lines.append(base[base_show + tested]
                                 .rename(columns=lambda c: c.replace("test_at_best/", "test "))
                                 .to_string(index=False))
                lines.extend(f"verdict: {line}" for line in self.verdicts.get(run.name, []))
                lines.append("")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_string()


def compare(paths: str | os.PathLike | list, *, objective: str | None = None, select: str | None = None,
            intervals: bool = True) -> Comparison:
    """Load experiments and put their trials and baselines in one table, scored by ``objective``.

    With ``objective=None`` each run is scored by its own ``val/best_objective``; with a name, every trial
    is re-ranked from its stored confusion counts (no retraining) and every baseline scored from its
    stored values. ``select`` ("max" or "lcb") overrides each run's selection rule; ``intervals=False``
    leaves out the verdicts and the confidence columns, except for a run ranked by "lcb", which needs them.
    """
    import pandas as pd

    from .confidence import check_rule

    if select is not None:
        check_rule(select)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    runs = [load_run(p, intervals=intervals) for p in paths]
    for run in runs:  # the lcb rule ranks by val/lcb: its run keeps the confidence columns even without intervals
        run.with_intervals = intervals or (select or run.select) == "lcb"
    names = [run.name for run in runs]
    for index, run in enumerate(runs):  # two runs with the same name: tell them apart by position
        if names.count(run.name) > 1:
            run.manifest = {**run.manifest, "name": f"{run.name}#{index}"}
    frames = []
    for run in runs:
        trials = run.df.copy()
        trials.insert(0, "run", run.name)
        trials.insert(1, "kind", "trial")
        trials.insert(2, "name", trials["trial_id"])
        if objective is None or objective == run.objective:
            trials["score"] = trials[SCORE_KEY]
        else:
            ranked = run.rerank(objective).set_index("trial_id")
            trials["score"] = trials["trial_id"].map(ranked[f"val/best_{objective}"])
            for column in TEST_AT_BEST:
                trials[column] = trials["trial_id"].map(ranked[column])
            if intervals:
                extra = run.intervals(objective).set_index("trial_id")
                for column in extra.columns:
                    trials[column] = trials["trial_id"].map(extra[column])
        frames.append(trials)
        if run.baselines:
            base = run.baselines_df.copy()
            base.insert(0, "run", run.name)
            base["kind"] = "baseline"
            counts = run.train_counts()
            base["score"] = [baseline_score(run.baselines[n], objective or run.objective,
                                            own_objective=run.objective, train_counts=counts) for n in base["name"]]
            if intervals:
                base = base.merge(run.baseline_intervals(objective), on="name", how="left")
            frames.append(base)
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    comparison = Comparison(runs=runs, objective=objective, df=df, select=select)
    if intervals:
        for run in runs:
            best = comparison.best.get(run.name)
            lines = run.verdicts(best["trial_id"], objective=objective) if best else {}
            comparison.verdicts[run.name] = [str(v) for v in lines.values()]
    return comparison


def _with_interval_text(part):
    """``part`` with text columns "val 90% CI", "test 90% CI" and "P(>base)" for printing (when it has them)."""
    if "val/ci_low" not in part:
        return part
    part = part.copy()
    for split, prefix in (("val", "val"), ("test", "test_at_best")):
        low, high = part[f"{prefix}/ci_low"], part[f"{prefix}/ci_high"]
        part[f"{split} 90% CI"] = [f"[{lo:.3f}, {hi:.3f}]" if lo == lo else "" for lo, hi in zip(low, high)]
    if "p_beats_baseline" in part:
        part["P(>base)"] = [f"{p:.2f}{'' if paired is None or paired != paired else ('p' if paired else 'u')}"
                            if p == p else "" for p, paired in zip(part["p_beats_baseline"], part["paired"])]
    return part
