"""Plots of an experiment (PNG files, matplotlib without a display; no pyplot state is touched).

    write_plots(load_run("results/demo"), "plots/")   # every plot that applies; returns the paths

- ``history.png``: each trial's score in start order, coloured by status, the running best and the baselines;
- ``per_class_recall.png``: per-class test recall of the best trials next to the starting head, tail shaded;
- ``objective_vs_params.png``: validation score vs ``s`` and vs ``refresh_every`` (log axes);
- ``pair_distribution.png``: the K x K pair distribution P of the best trial at its best report;
- ``pareto.png``: multi-objective sweeps only, every trial in objective space, the Pareto front joined.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .constants import SCORE_KEY
from .errors import ExperimentError

__all__ = [
    "write_plots",
    "plot_history",
    "plot_per_class",
    "plot_objective_vs_params",
    "plot_pair_distribution",
    "plot_pareto",
]

STATUS_COLOURS = {"complete": "tab:blue", "pruned": "tab:gray", "errored": "tab:red", "running": "tab:orange"}


def _figure(width: float = 7.0, height: float = 4.5):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_history(run, path: str | os.PathLike) -> Path:
    """Score (``val/best_objective``) of every trial in start order, the running best, the baselines."""
    df = run.df
    fig = _figure(8.5, 4.5)
    ax = fig.add_subplot()
    order = np.arange(len(df))
    for status, colour in STATUS_COLOURS.items():
        mask = (df["status"] == status).to_numpy()
        if mask.any():
            ax.scatter(order[mask], df[SCORE_KEY].to_numpy(dtype=float)[mask], s=22, color=colour, label=status)
    scores = df[SCORE_KEY].to_numpy(dtype=float)
    if np.isfinite(scores).any():
        running = np.fmax.accumulate(np.where(np.isfinite(scores), scores, -np.inf))
        running[~np.isfinite(running)] = np.nan
        ax.step(order, running, where="post", color="black", linewidth=1.2, label="best so far")
    baselines = run.baselines_df
    for (_, row), style in zip(baselines.iterrows(), ["--", ":", "-.", (0, (5, 1)), (0, (1, 3))]):
        if row.get(SCORE_KEY) is not None and np.isfinite(row[SCORE_KEY]):
            ax.axhline(row[SCORE_KEY], linestyle=style, linewidth=0.9, color="tab:green", alpha=0.7,
                       label=f"baseline {row['name']}")
    ax.set_xlabel("trial (start order)")
    ax.set_ylabel(f"{SCORE_KEY} ({run.objective})")
    ax.set_title(f"{run.name}: optimisation history")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def plot_per_class(run, path: str | os.PathLike, *, top: int = 3, split: str = "test") -> Path:
    """Per-class recall bars of the ``top`` best trials next to the starting head; tail classes shaded."""
    table = run.per_class(top=top, split=split)
    labels = [c for c in table.columns if c not in ("band", "train_count") and " - " not in c]
    K = len(table)
    fig = _figure(max(7.0, 0.45 * K * max(len(labels), 1) / 2), 4.5)
    ax = fig.add_subplot()
    width = 0.8 / max(len(labels), 1)
    x = np.arange(K)
    for i, label in enumerate(labels):
        name = f"{label} (reference)" if i == 0 and label in run.baselines else label
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, table[label].to_numpy(dtype=float), width, label=name)
    for k in np.flatnonzero((table["band"] == "tail").to_numpy()):
        ax.axvspan(k - 0.5, k + 0.5, color="tab:red", alpha=0.08, linewidth=0)
    ax.set_xticks(x)
    ax.set_xlabel("class (shaded: tail)")
    ax.set_ylabel(f"{split} recall")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{run.name}: per-class {split} recall at each trial's best report")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def plot_objective_vs_params(run, path: str | os.PathLike, *, params: tuple[str, ...] = ("s", "refresh_every")
                             ) -> Path:
    """Validation score against each searched parameter of ``params`` (log x axes), by method."""
    df = run.df
    present = [p for p in params if f"config/{p}" in df and df[f"config/{p}"].notna().any()]
    if not present:
        raise ExperimentError(f"{run.name} searched none of {', '.join(params)}; nothing to plot against.")
    fig = _figure(5.0 * len(present), 4.0)
    axes = fig.subplots(1, len(present), squeeze=False)[0]
    methods = df["config/method"] if "config/method" in df else None
    for ax, param in zip(axes, present):
        values = df[f"config/{param}"]
        groups = [("all", np.ones(len(df), dtype=bool))] if methods is None else \
            [(m, (methods == m).to_numpy()) for m in methods.dropna().unique()]
        for label, mask in groups:
            mask = mask & values.notna().to_numpy()
            ax.scatter(values[mask].astype(float), df[SCORE_KEY][mask].astype(float), s=22, label=label)
        ax.set_xscale("log")
        ax.set_xlabel(param)
        ax.set_ylabel(f"{SCORE_KEY} ({run.objective})")
        ax.legend(fontsize=7)
    fig.suptitle(f"{run.name}: validation score vs parameters")
    return _save(fig, path)


def plot_pair_distribution(run, path: str | os.PathLike, *, trial_id: str | None = None) -> Path:
    """Heatmap of the pair distribution P (K x K, rows = label class i, columns = partner j) of the best
    trial that has one (``erm`` has none), at its best report."""
    candidates = [trial_id] if trial_id else \
        list(run.df[run.df[SCORE_KEY].notna()].sort_values(SCORE_KEY, ascending=False, kind="stable")["trial_id"])
    P, chosen = None, None
    for candidate in candidates:
        try:
            P = run.history(candidate).best_p()
        except ExperimentError:
            continue
        if P is not None:
            chosen = candidate
            break
    if P is None:
        raise ExperimentError(f"{run.name}: no trial has a pair distribution at its best report (erm has none).")
    fig = _figure(6.0, 5.0)
    ax = fig.add_subplot()
    image = ax.imshow(P, cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="P[i, j]")
    ax.set_xlabel("partner class j")
    ax.set_ylabel("label class i")
    ax.set_title(f"{run.name}: P of trial {chosen} at its best report")
    return _save(fig, path)


def pareto_mask(points: np.ndarray) -> np.ndarray:
    """(n,) True for points (n, m) that no other point dominates (every objective maximised)."""
    points = np.asarray(points, dtype=float)
    keep = np.ones(len(points), dtype=bool)
    for i, p in enumerate(points):
        dominated = np.all(points >= p, axis=1) & np.any(points > p, axis=1)
        keep[i] = not dominated.any()
    return keep


def plot_pareto(run, path: str | os.PathLike) -> Path:
    """Trials of a multi-objective sweep in the plane of its first two ranked metrics; front joined."""
    metrics = list(run.manifest.get("metrics") or [])
    if not run.is_multi_objective or len(metrics) < 2:
        raise ExperimentError(f"{run.name} is not a multi-objective sweep; a Pareto front needs two objectives.")
    x_key, y_key = metrics[0], metrics[1]
    df = run.df[[x_key, y_key, "status"]].dropna(subset=[x_key, y_key])
    points = df[[x_key, y_key]].to_numpy(dtype=float)
    fig = _figure(6.0, 5.0)
    ax = fig.add_subplot()
    for status, colour in STATUS_COLOURS.items():
        mask = (df["status"] == status).to_numpy()
        if mask.any():
            ax.scatter(points[mask, 0], points[mask, 1], s=22, color=colour, label=status)
    if len(points):
        front = points[pareto_mask(points)]
        front = front[np.argsort(front[:, 0])]
        ax.plot(front[:, 0], front[:, 1], "k-o", markersize=4, linewidth=1, label="Pareto front")
    ax.set_xlabel(f"{x_key} ({run.objectives[0]})")
    ax.set_ylabel(f"{y_key} ({run.objectives[1]})")
    ax.set_title(f"{run.name}: Pareto front")
    ax.legend(fontsize=7)
    return _save(fig, path)


def write_plots(run, directory: str | os.PathLike) -> list[Path]:
    """Write every plot that applies to ``run`` into ``directory``; returns the written paths.

    A plot that does not apply (no ``s`` searched, no P, single objective, no trial reported yet) is left
    out rather than drawn empty.
    """
    directory = Path(directory)
    written = []
    if run.df[SCORE_KEY].notna().any():
        written.append(plot_history(run, directory / "history.png"))
    else:
        return written
    plotters = [
        (plot_per_class, "per_class_recall.png"),
        (plot_objective_vs_params, "objective_vs_params.png"),
        (plot_pair_distribution, "pair_distribution.png"),
    ]
    if run.is_multi_objective:
        plotters.append((plot_pareto, "pareto.png"))
    for plotter, filename in plotters:
        try:
            written.append(plotter(run, directory / filename))
        except ExperimentError:
            continue
    return written
