"""Read experiment directories without Ray: trials, the best one, baselines, re-ranking, per-class views.

An experiment directory (docs/architecture.md, Experiment folder) is what ``search`` writes under ``<storage>/<name>/``: Ray
Tune's files (one folder per trial with ``params.json``, ``result.json`` and ``checkpoint_XXXXXX/``
folders holding the trial's history), the manifest, the Optuna journal and ``baselines.json``. Everything
here reads those files only, so it works with Ray stopped and on a sweep that is still running or was
interrupted (a half-written line or checkpoint is skipped, never trusted).

    run = load_run("results/demo")
    run.df                      # one row per Tune trial (pandas); run.table is the same as a pyarrow Table
    run.best                    # the trial with the highest val/best_objective (the selection rule)
    run.rerank("gmean")         # every trial scored by another objective from its stored confusion counts
    run.per_class([...])        # per-class recall side by side, head/tail band, difference from a reference

Status of a trial: ``complete`` (reached ``steps``), ``pruned`` (stopped early by the scheduler),
``errored`` (failed for good) or ``running`` (still running, pending, or cut off by an interruption).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from .baselines import REFERENCE, baseline_recall, baseline_row
from .checks import is_number
from .constants import (
    BASELINES_FILE,
    HISTORY_FILE,
    JOURNAL_FILE,
    MANIFEST_FILE,
    METRIC_NAMES,
    SCORE_KEY,
    STEP_KEY,
)
from .errors import ExperimentError
from .faults import read_last_result, unlisted_errored_rows
from .history import History
from .metrics import head_mask, joint_confusion, metric_values
from .tune_adapter import TuneTrialState, read_trial_states

__all__ = ["Run", "TrialHistory", "load_run", "STATUSES"]

STATUSES = ("complete", "pruned", "errored", "running")
TEST_AT_BEST = tuple(f"test_at_best/{m}" for m in METRIC_NAMES)


@dataclass
class TrialHistory:
    """A trial's stored histories, read without torch: ``copies`` holds one :class:`History` per repeat
    (one without repeats); the first copy's steps, best step and meta stand for the trial."""

    trial_id: str
    copies: list[History]

    @property
    def n_classes(self) -> int:
        return self.copies[0].n_classes

    @property
    def steps(self) -> list[int]:
        return self.copies[0].steps

    @property
    def best_step(self) -> int | None:
        return self.copies[0].best_step

    def best_index(self) -> int:
        return self.copies[0].best_index()

    def confusion(self, index: int, split: str = "val", copy: int = 0) -> np.ndarray:
        """Dense (K, K) confusion counts of report ``index`` (rows = true class)."""
        return self.copies[copy].confusion(index, split)

    def recall(self, index: int, split: str = "test") -> np.ndarray:
        """(K,) per-class recall of report ``index``, averaged over repeats."""
        return np.mean([c.recall(index, split) for c in self.copies], axis=0)

    def index_of_step(self, step: int) -> int:
        try:
            return self.copies[0].index_of_step(step)
        except ExperimentError as error:
            raise ExperimentError(f"trial {self.trial_id}: {error}") from None

    def best_p(self) -> np.ndarray | None:
        """(K, K) float32 pair distribution in force at the best report (first copy), or None."""
        return self.copies[0].best_p

    @property
    def train_counts(self) -> np.ndarray | None:
        return self.copies[0].train_counts

    @property
    def val_predictions(self) -> np.ndarray | None:
        """(repeats, n_val) int64 predicted class of every validation image at each copy's best report, in
        the FeatureSet's validation order (``history`` module docstring); None when a copy has none stored
        (histories written before they were). Row r reproduces copy r's best ``"val"`` counts."""
        return _stacked(self.copies, "best_val_predictions")

    @property
    def test_predictions(self) -> np.ndarray | None:
        """(repeats, n_test) int64, as :attr:`val_predictions` on the test images."""
        return _stacked(self.copies, "best_test_predictions")


def _stacked(copies: list[History], name: str) -> np.ndarray | None:
    arrays = [getattr(copy, name) for copy in copies]
    return None if any(a is None for a in arrays) else np.stack(arrays)


@dataclass
class Run:
    """One experiment directory, read from disk. Build it with :func:`load_run`."""

    path: Path
    manifest: dict[str, Any]
    trial_rows: list[dict[str, Any]]
    trial_dirs: dict[str, Path]
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    with_intervals: bool = True  # Run.df carries the confidence columns (selmix_ray.confidence)
    _histories: dict[str, TrialHistory] = field(default_factory=dict, repr=False)

    # -- what the sweep was ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return str(self.manifest.get("name") or self.path.name)

    @property
    def objectives(self) -> list[str]:
        space = self.manifest.get("space") or {}
        if "objectives" in space:
            return list(space["objectives"])
        if "objective" in space:
            return [space["objective"]]
        names = self.manifest.get("objectives") or [self.manifest.get("objective", "min_recall")]
        return list(names)

    @property
    def objective(self) -> str:
        """The objective trials trained for and ``val/best_objective`` measures."""
        return self.objectives[0]

    @property
    def is_multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def objective_params(self) -> dict[str, Any]:
        return dict(((self.manifest.get("space") or {}).get("fixed") or {}).get("objective_params") or {})

    # -- tables ---------------------------------------------------------------------------------------

    @cached_property
    def df(self):
        """pandas DataFrame, one row per Tune trial (baselines are in :attr:`baselines_df`)."""
        import pandas as pd

        extra = [m for m in self.manifest.get("metrics") or [] if m != SCORE_KEY]
        columns = ["trial_id", "status", "steps_reached", "steps", "wall_time_s", "start_time",
                   "num_failures", SCORE_KEY, *extra, *TEST_AT_BEST, "problem"]
        df = pd.DataFrame(self.trial_rows)
        for column in columns:
            if column not in df:
                df[column] = pd.Series(dtype=float)
        config_columns = sorted(c for c in df.columns if c.startswith("config/"))
        df = df[columns + config_columns]
        df.insert(1, "optuna_trial", df["trial_id"].map(self._optuna_numbers()).astype("Int64"))
        if self.with_intervals:
            from .confidence import join_intervals

            df = join_intervals(df, self.intervals())
        return df.sort_values("start_time", kind="stable").reset_index(drop=True)

    @property
    def select(self) -> str:
        """The selection rule of the experiment ("max" or "lcb"; module selmix_ray.confidence)."""
        from .confidence import selection_rule

        return selection_rule(self.manifest)

    def intervals(self, objective: str | None = None, **options):
        """Per-trial confidence columns (:func:`selmix_ray.confidence.trial_intervals`; ``options``: level,
        resamples, seed). The default call is computed once per Run."""
        from .confidence import trial_intervals

        if objective is None and not options:
            if "_intervals" not in self.__dict__:
                self.__dict__["_intervals"] = trial_intervals(self)
            return self.__dict__["_intervals"]
        return trial_intervals(self, objective=objective, **options)

    def baseline_intervals(self, objective: str | None = None, **options):
        """Per-baseline val/test intervals (:func:`selmix_ray.confidence.baseline_intervals`)."""
        from .confidence import baseline_intervals

        return baseline_intervals(self, objective=objective, **options)

    def verdicts(self, trial_id: str | None = None, **options):
        """{"validation": Verdict, "test": Verdict}: the selected trial (or ``trial_id``) against the best
        baseline (:func:`selmix_ray.confidence.best_verdicts`); {} without a baseline."""
        from .confidence import best_verdicts

        return best_verdicts(self, trial_id, **options)

    @property
    def study(self):
        """The experiment's Optuna study, loaded from its journal (needs Optuna); for reading."""
        from .ecosystem import load_study

        return load_study(self.path, self.name)

    def result_grid(self):
        """Ray Tune's ``ResultGrid`` of this experiment (needs Ray installed; starts nothing)."""
        from .ecosystem import result_grid

        return result_grid(self.path)

    @property
    def table(self):
        """The trials as a pyarrow Table (same columns as :attr:`df`)."""
        import pyarrow as pa

        return pa.Table.from_pandas(self.df, preserve_index=False)

    @property
    def baselines_df(self):
        """pandas DataFrame, one row per baseline of ``baselines.json`` (``kind`` = "baseline")."""
        import pandas as pd

        rows = [baseline_row(name, record) for name, record in self.baselines.items()]
        return pd.DataFrame(rows, columns=["name", "kind", SCORE_KEY, *TEST_AT_BEST])

    @property
    def best(self) -> dict[str, Any] | None:
        """The trial the selection rule picks (:attr:`select`; "max": the highest ``val/best_objective``,
        "lcb": the highest ``val/lcb``; ties: the earliest), as a row dict."""
        from .confidence import join_intervals, rank_key

        key = rank_key(self.select)
        df = self.df
        if key not in df:  # Run built with with_intervals=False: the lcb column is computed here
            df = join_intervals(df, self.intervals())
        df = df[df[SCORE_KEY].notna() & df[key].notna()]
        if df.empty:
            return None
        return df.loc[df[key].idxmax()].to_dict()

    def config(self, trial_id: str) -> dict[str, Any]:
        """The trial's Tune config (sampled values and the space's fixed values)."""
        return _read_json(self._trial_dir(trial_id) / "params.json", what="trial parameters")

    # -- histories, re-ranking, per-class -------------------------------------------------------------

    def history(self, trial_id: str) -> TrialHistory:
        """The history stored in the trial's latest checkpoint (read once per Run, then kept)."""
        if trial_id in self._histories:
            return self._histories[trial_id]
        folder = self._trial_dir(trial_id)
        data = _latest_history(folder)
        if data is None:
            raise ExperimentError(
                f"trial {trial_id} has no checkpoint with {HISTORY_FILE} yet (folder {folder}); it has not "
                "reported, or it was written by something other than selmix-ray's trainable."
            )
        copies = [History.from_dict(c) for c in (data if isinstance(data, list) else [data])]
        self._histories[trial_id] = TrialHistory(trial_id=trial_id, copies=copies)
        return self._histories[trial_id]

    def train_counts(self) -> np.ndarray | None:
        """(K,) training counts per class (defines head and tail), if the experiment recorded them
        (manifest, baselines, or the meta of the first trial history)."""
        for source in (self.manifest, *self.baselines.values()):
            if isinstance(source, dict) and source.get("train_counts") is not None:
                return np.asarray(source["train_counts"])
        for trial_id in self.trial_dirs:
            try:
                return self.history(trial_id).train_counts
            except ExperimentError:
                continue
        return None

    def rerank(self, objective: str | None = None, **objective_params):
        """Score every trial under ``objective`` from its stored validation confusion counts.

        For each trial: the objective's value at every report (mean over repeats), the best so far
        (``val/best_<objective>``), its step, and the test metrics at that report
        (``test_at_best/<metric>``, plus ``test_at_best/<objective>``). No retraining. Sorted best first.
        Without ``objective`` the sweep's own objective (then ``val/best_<objective>`` reproduces the
        reported ``val/best_objective``).
        """
        import pandas as pd

        from .objectives import get_objective

        objective = objective or self.objective
        if not objective_params and objective == self.objective:
            objective_params = self.objective_params
        train_counts = self.train_counts()
        if train_counts is None and "head_tail" in objective:
            raise ExperimentError(
                f"cannot re-rank {self.path} by {objective!r}: it needs the training class counts (head/tail), "
                f"and the experiment recorded none (manifest, {BASELINES_FILE} or history meta 'train_counts')."
            )
        scorer = get_objective(objective, train_counts=train_counts, **objective_params)
        rows = []
        for trial_id in self.df["trial_id"]:
            try:
                history = self.history(trial_id)
            except ExperimentError:
                continue
            rows.append({"trial_id": trial_id, **_rescore(history, scorer, objective, train_counts)})
        columns = ["trial_id", f"val/best_{objective}", "best_step", *TEST_AT_BEST]
        if f"test_at_best/{objective}" not in columns:
            columns.insert(3, f"test_at_best/{objective}")
        df = pd.DataFrame(rows, columns=columns)
        return df.sort_values(f"val/best_{objective}", ascending=False, kind="stable").reset_index(drop=True)

    def per_class(self, trial_ids: list[str] | None = None, *, reference: str | None = None,
                  split: str = "test", top: int = 3, intervals: bool = False):
        """Per-class recall (at each trial's best report) side by side, with head/tail bands.

        Args:
            trial_ids: trials to show (default: the ``top`` best by ``val/best_objective``).
            reference: a trial id or a baseline name the differences are taken from (default: the
                "start" baseline (the starting head) if there is one, else the first trial shown).
            split: "test" or "val".
            intervals: also ``<label> low`` / ``<label> high``, the 90% Wilson interval of each recall.

        Returns:
            DataFrame indexed by class with columns ``band`` (head/tail), ``train_count``, one recall
            column per trial / reference (and its interval), and ``<label> - <reference>`` differences.
        """
        import pandas as pd

        if trial_ids is None:
            from .confidence import rank_key

            key = rank_key(self.select) if rank_key(self.select) in self.df else SCORE_KEY
            ranked = self.df[self.df[SCORE_KEY].notna()].sort_values(key, ascending=False, kind="stable")
            trial_ids = list(ranked["trial_id"][:top])
        columns: dict[str, np.ndarray] = {}
        for trial_id in trial_ids:
            history = self.history(trial_id)
            index = history.index_of_step(history.best_step) if history.best_step is not None else -1
            columns[trial_id] = history.recall(index, split)
        if reference is None:
            reference = REFERENCE if REFERENCE in self.baselines else (trial_ids[0] if trial_ids else None)
        if reference is not None and reference not in columns:
            columns = {reference: self._recall_of(reference, split), **columns}
        if not columns:
            raise ExperimentError(f"{self.path} has no trial with a history to show per class.")
        K = len(next(iter(columns.values())))
        counts = self.train_counts()
        df = pd.DataFrame(index=pd.RangeIndex(K, name="class"))
        df["band"] = np.where(head_mask(counts, K), "head", "tail")
        df["train_count"] = counts if counts is not None else np.nan
        for label, recall in columns.items():
            df[label] = recall
            if intervals:
                from .confidence import per_class_intervals

                df[f"{label} low"], df[f"{label} high"] = per_class_intervals(self, label, split).T
        for label in columns:
            if label != reference:
                df[f"{label} - {reference}"] = df[label] - df[reference]
        return df

    def importance(self) -> dict[str, float]:
        """Parameter importance (fANOVA-like, Optuna's default) from the study in the journal. Slow on
        large studies; needs Optuna (imported here)."""
        import optuna

        journal = self.path / JOURNAL_FILE
        if not journal.is_file():
            raise ExperimentError(f"{self.path} has no {JOURNAL_FILE}; parameter importance needs the Optuna study.")
        from .storage import journal_storage

        try:
            storage = journal_storage(journal)
            names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
            study_name = self.name if self.name in names else (names[0] if names else None)
            study = study_name and optuna.load_study(study_name=study_name, storage=storage)
        except (ValueError, KeyError, TypeError, IndexError) as err:  # UnicodeDecodeError, JSONDecodeError, ...
            raise ExperimentError(f"{journal} is damaged, Optuna cannot read it ({type(err).__name__}: {err}); "
                                  "parameter importance needs the study (the other tables do not). Restore the "
                                  "file from a backup.") from err
        if study_name is None:
            raise ExperimentError(f"{journal} holds no Optuna study.")
        target = (lambda t: t.values[0]) if self.is_multi_objective else None
        return dict(optuna.importance.get_param_importances(study, target=target))

    # -- helpers --------------------------------------------------------------------------------------

    def _optuna_numbers(self) -> dict[str, int]:
        """{Tune trial id: Optuna trial number}, {} when the study cannot be read (selmix_ray.ecosystem)."""
        from .ecosystem import optuna_trial_numbers

        try:
            return optuna_trial_numbers(self.path, self.name)
        except OSError:  # unreadable journal: the column stays empty
            return {}

    def _trial_dir(self, trial_id: str) -> Path:
        if trial_id not in self.trial_dirs:
            raise ExperimentError(
                f"{self.path} has no trial {trial_id!r}; trials are {', '.join(sorted(self.trial_dirs)) or 'none'}."
            )
        return self.trial_dirs[trial_id]

    def _recall_of(self, label: str, split: str) -> np.ndarray:
        if label in self.baselines:
            record = self.baselines[label]
            recall = baseline_recall(record, split)
            if recall is None:
                raise ExperimentError(f"baseline {label!r} in {BASELINES_FILE} has no per-class {split} recall.")
            return recall
        history = self.history(label)
        index = history.index_of_step(history.best_step) if history.best_step is not None else -1
        return history.recall(index, split)


def load_run(path: str | os.PathLike, *, intervals: bool = True) -> Run:
    """Read an experiment directory (finished, running or interrupted) without Ray.

    ``intervals=False`` leaves the confidence columns out of ``Run.df`` (they cost a bootstrap per trial:
    about 10 ms at K = 10, more at K = 1000; module selmix_ray.confidence).

    Raises:
        ExperimentError: the path does not exist, is not a selmix-ray experiment, or its manifest is corrupted.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise ExperimentError(f"{path} is not a directory; pass the experiment folder <storage>/<name>.")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ExperimentError(
            f"{path} is not a selmix-ray experiment: it has no {MANIFEST_FILE}. Pass the folder that "
            "run_search.py / search() created (<storage>/<name>), not its parent or a plain Ray Tune run."
        )
    manifest = _read_json(manifest_path, what="experiment manifest")
    if not isinstance(manifest, dict):
        raise ExperimentError(f"{manifest_path} is corrupted: expected a JSON object, got {type(manifest).__name__}.")
    baselines = {}
    if (path / BASELINES_FILE).is_file():
        baselines = _read_json(path / BASELINES_FILE, what="baselines")
        if not isinstance(baselines, dict):
            raise ExperimentError(f"{path / BASELINES_FILE} is corrupted: expected a JSON object of baselines.")
        baselines = baselines["baselines"] if isinstance(baselines.get("baselines"), dict) else baselines
    tune_states = read_trial_states(path)
    steps_default = _fixed_steps(manifest)
    extra_metrics = [m for m in manifest.get("metrics") or [] if m != SCORE_KEY]
    rows, dirs = [], {}
    for folder in sorted(p for p in path.iterdir() if p.is_dir() and (p / "params.json").is_file()):
        row = _trial_row(folder, tune_states, steps_default, extra_metrics)
        if row is None:
            continue
        dirs[row["trial_id"]] = folder
        rows.append(row)
    for row, folder in unlisted_errored_rows(path, tune_states, dirs):  # failed as it started: listed anyway
        rows.append(row)
        if folder is not None:
            dirs[row["trial_id"]] = folder
    return Run(path=path, manifest=manifest, trial_rows=rows, trial_dirs=dirs, baselines=baselines,
               with_intervals=intervals)


# -- reading Tune's files ------------------------------------------------------------------------------


def _read_json(path: Path, *, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExperimentError(f"{path} ({what}) is corrupted or unreadable: {err}. "
                              "Restore it from a backup or start a new experiment name.") from err


def _fixed_steps(manifest: dict[str, Any]) -> int | None:
    steps = manifest.get("steps", ((manifest.get("space") or {}).get("fixed") or {}).get("steps"))
    return int(steps) if is_number(steps) else None


def _trial_row(folder: Path, tune_states: dict[str, TuneTrialState], steps_default: int | None,
               extra_metrics: list[str]) -> dict[str, Any] | None:
    try:
        params = json.loads((folder / "params.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # being written
    result, problem = read_last_result(folder)
    result = result or {}
    trial_id = result.get("trial_id") or _trial_id_from_dirname(folder.name, tune_states)
    if trial_id is None:
        return None
    tune = tune_states.get(trial_id)
    steps = params.get("steps", steps_default)
    reached = result.get(STEP_KEY)
    tune_status = None if tune is None else tune.status
    if tune_status == "ERROR" or (tune_status is None and (folder / "error.txt").is_file()):
        status = "errored"
    elif reached is not None and steps is not None and reached >= steps:
        status = "complete"
    elif tune_status == "TERMINATED":
        status = "pruned"
    else:
        status = "running"
    row: dict[str, Any] = {
        "trial_id": trial_id,
        "status": status,
        "steps_reached": None if reached is None else int(reached),
        "steps": steps,
        "wall_time_s": result.get("time_total_s"),
        "start_time": _start_time(folder, result),
        "num_failures": 0 if tune is None else tune.num_failures,
        SCORE_KEY: result.get(SCORE_KEY),
        "problem": problem,
    }
    for key in (*TEST_AT_BEST, *extra_metrics):  # extra: e.g. val/mean_recall, ranked by a multi-objective sweep
        row[key] = result.get(key)
    for key, value in params.items():
        row[f"config/{key}"] = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value
    return row


def _trial_id_from_dirname(dirname: str, tune_states: dict[str, TuneTrialState]) -> str | None:
    for trial_id, state in tune_states.items():
        if state.relative_logdir == dirname or trial_id in dirname:
            return trial_id
    return None


def _start_time(folder: Path, result: dict[str, Any]) -> float:
    if "timestamp" in result and "time_total_s" in result:
        return float(result["timestamp"]) - float(result["time_total_s"])
    return folder.stat().st_mtime


def _latest_history(folder: Path) -> Any:
    """Parsed HISTORY_FILE of the newest readable checkpoint_XXXXXX folder of a trial (None: none yet)."""
    for checkpoint in sorted(folder.glob("checkpoint_*"), reverse=True):
        try:
            return json.loads((checkpoint / HISTORY_FILE).read_bytes())
        except (OSError, ValueError):
            continue  # missing or half-written: an older checkpoint is still good
    return None


# -- scoring ---------------------------------------------------------------------------------------


def _rescore(history: TrialHistory, scorer, objective: str, train_counts) -> dict[str, Any]:
    """Best-so-far of ``scorer`` over the reports (mean over copies) and the test metrics there."""
    K = history.n_classes
    head = head_mask(train_counts, K)
    n_reports = len(history.steps)
    best_value, best_index = -math.inf, None
    for index in range(n_reports):
        values = [scorer.value(joint_confusion(history.confusion(index, "val", c)))
                  for c in range(len(history.copies))]
        value = float(np.mean(values))
        if value > best_value:
            best_value, best_index = value, index
    out: dict[str, Any] = {f"val/best_{objective}": None, "best_step": None}
    if best_index is None:
        return out
    tests = []
    for c in range(len(history.copies)):
        C = joint_confusion(history.confusion(best_index, "test", c))
        tests.append({**metric_values(C, head), objective: scorer.value(C)})
    out[f"val/best_{objective}"] = best_value
    out["best_step"] = history.steps[best_index]
    out[f"test_at_best/{objective}"] = float(np.mean([t[objective] for t in tests]))
    for m in METRIC_NAMES:
        if m != "objective":
            out[f"test_at_best/{m}"] = float(np.mean([t[m] for t in tests]))
    out["test_at_best/objective"] = out[f"test_at_best/{objective}"]
    return out
