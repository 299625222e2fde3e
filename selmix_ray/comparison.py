"""Several experiments side by side: their trials and baselines in one table, scored by one objective.

    compare(["results/a", "results/b"], objective="gmean").to_string(top=10)

With ``objective=None`` each run is scored by its own ``val/best_objective``; with a name, every trial is
re-ranked from its stored confusion counts (no retraining) and every baseline scored from its stored values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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

    @property
    def table(self):
        import pyarrow as pa

        return pa.Table.from_pandas(self.df, preserve_index=False)

    @property
    def best(self) -> dict[str, dict[str, Any]]:
        """Best trial per run under the comparison's objective: {run name: row}."""
        out = {}
        trials = self.df[(self.df["kind"] == "trial") & self.df["score"].notna()]
        for run_name, group in trials.groupby("run", sort=False):
            out[run_name] = group.loc[group["score"].idxmax()].to_dict()
        return out

    def to_string(self, *, top: int = 10) -> str:
        """A readable table: per run, the ``top`` trials by score, then its baselines."""
        import pandas as pd

        lines = []
        show = ["name", "status", "steps_reached", "score", "test_at_best/min_recall", "test_at_best/mean_recall"]
        with pd.option_context("display.width", 200, "display.max_columns", 30, "display.max_colwidth", 40,
                               "display.float_format", "{:.4f}".format):
            for run in self.runs:
                part = self.df[self.df["run"] == run.name]
                objective = self.objective or run.objective
                tested = [f"test_at_best/{objective}"] if f"test_at_best/{objective}" in part and \
                    f"test_at_best/{objective}" not in show else []  # e.g. a gmean sweep's test gmean
                trials = part[part["kind"] == "trial"].sort_values("score", ascending=False, kind="stable")
                counts = trials["status"].value_counts().to_dict()
                summary = ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUSES)
                lines.append(f"== {run.name} ({run.path}) - score: val/best_{objective} - "
                             f"{len(trials)} trials: {summary}")
                config_columns = [c for c in trials.columns if c.startswith("config/")
                                  and trials[c].nunique(dropna=True) > 1]
                head = trials.head(top)[show + tested + config_columns].astype({"steps_reached": "Int64"}).rename(
                    columns=lambda c: c.replace("config/", "").replace("test_at_best/", "test "))
                lines.append(head.to_string(index=False) if not head.empty else "(no trial has reported yet)")
                base = part[part["kind"] == "baseline"]
                if not base.empty:
                    lines.append("baselines:")
                    lines.append(base[["name", "score", "test_at_best/min_recall", "test_at_best/mean_recall",
                                       *tested]]
                                 .rename(columns=lambda c: c.replace("test_at_best/", "test "))
                                 .to_string(index=False))
                lines.append("")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_string()


def compare(paths: str | os.PathLike | list, *, objective: str | None = None) -> Comparison:
    """Load experiments and put their trials and baselines in one table, scored by ``objective``.

    With ``objective=None`` each run is scored by its own ``val/best_objective``; with a name, every trial
    is re-ranked from its stored confusion counts (no retraining) and every baseline scored from its
    stored values.
    """
    import pandas as pd

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    runs = [load_run(p) for p in paths]
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
        frames.append(trials)
        if run.baselines:
            base = run.baselines_df.copy()
            base.insert(0, "run", run.name)
            base["kind"] = "baseline"
            counts = run.train_counts()
            base["score"] = [baseline_score(run.baselines[n], objective or run.objective,
                                            own_objective=run.objective, train_counts=counts) for n in base["name"]]
            frames.append(base)
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return Comparison(runs=runs, objective=objective, df=df)
