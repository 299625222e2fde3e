"""Plots of an experiment (PNG files, matplotlib without a display; no pyplot state is touched by ours).

    write_plots(load_run("results/demo"), "plots/")   # every plot that applies; returns the paths

- ``history.png``: each trial's score in start order, coloured by status, the running best and the baselines;
- ``per_class_recall.png``: per-class test recall of the best trials next to the starting head, tail shaded;
- ``objective_vs_params.png``: validation score against every searched parameter, one panel each: a
  scatter for numbers (log axis where the domain is log), a box and the points per category for choices;
  colour = method, marker = status (complete, pruned, ...), the baselines as horizontal lines;
- ``pair_distribution.png``: the K x K pair distribution P of the best ``selmix`` trial at its best report
  (other methods' P is uniform or absent: left out, with a log line, when no selmix trial reported);
- ``pareto.png``: multi-objective sweeps only, every trial in objective space, the Pareto front joined;
- ``optuna_*.png``: Optuna's own matplotlib plots of the experiment's study (parameter importances,
  parallel coordinates, slice, intermediate values), written beside ours with ``optuna=True`` (the CLI's
  choice) when Optuna's matplotlib support imports; each one that cannot be drawn (e.g. importances with under two complete trials) is
  left out with a log line.

``objective``: the plots that rank or score trials (per-class, objective vs parameters, pair distribution)
use ``val/best_<objective>`` re-ranked from the stored confusion counts (``Run.rerank``) instead of the
sweep's own score, and the baselines' scores under it; Optuna's plots always show the study's own
objective (what the sampler saw). Baselines are drawn in one style each (:func:`baseline_styles`: colour
and line style), the same in every plot. Titles are wrapped to the figure's width (:func:`_title`).
"""

from __future__ import annotations

import math
import os
import textwrap
import warnings
from pathlib import Path

import numpy as np

from .constants import SCORE_KEY
from .errors import ExperimentError
from .progress import log

__all__ = [
    "write_plots",
    "plot_history",
    "plot_per_class",
    "plot_objective_vs_params",
    "plot_pair_distribution",
    "plot_pareto",
    "plot_optuna",
    "baseline_styles",
    "searched_params",
]

STATUS_COLOURS = {"complete": "tab:blue", "pruned": "tab:gray", "errored": "tab:red", "running": "tab:orange"}
STATUS_MARKERS = {"complete": ("o", 0.9), "pruned": ("x", 0.55), "errored": ("s", 0.55), "running": ("^", 0.7)}
BASELINE_COLOURS = ("tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "black")
BASELINE_LINESTYLES = ("--", ":", "-.", (0, (5, 1)), (0, (1, 3)), (0, (3, 1, 1, 1)), (0, (6, 2, 1, 2)))
METHOD_COLOURS = ("tab:blue", "tab:orange", "tab:red", "tab:purple", "tab:brown")
TITLE_SIZE = 10  # points; at this size about TITLE_CHARS_PER_INCH characters fit per inch of figure
TITLE_CHARS_PER_INCH = 13
OPTUNA_PLOTS = ("param_importances", "parallel_coordinate", "slice", "intermediate_values")


def _figure(width: float = 7.0, height: float = 4.5):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _title(target, text: str, *, width_in: float) -> None:
    """Set ``text`` as the title of an Axes (or suptitle of a Figure), wrapped to ``width_in`` inches."""
    wrapped = "\n".join(textwrap.fill(part, max(20, int(width_in * TITLE_CHARS_PER_INCH)))
                         for part in text.split("\n"))
    if hasattr(target, "set_title"):
        target.set_title(wrapped, fontsize=TITLE_SIZE)
    else:
        target.suptitle(wrapped, fontsize=TITLE_SIZE + 1)


def baseline_styles(names) -> dict[str, tuple[str, object]]:
    """{baseline name: (colour, linestyle)}, one distinct pair each, in the order given."""
    return {name: (BASELINE_COLOURS[i % len(BASELINE_COLOURS)], BASELINE_LINESTYLES[i % len(BASELINE_LINESTYLES)])
            for i, name in enumerate(names)}


def _scores(run, objective: str | None):
    """(scores (n,) aligned with ``run.df``, axis label): the sweep's own score, or ``objective``'s re-ranked."""
    if objective is None or objective == run.objective:
        return run.df[SCORE_KEY].to_numpy(dtype=float), f"{SCORE_KEY} ({run.objective})"
    ranked = run.rerank(objective).set_index("trial_id")[f"val/best_{objective}"]
    return run.df["trial_id"].map(ranked).to_numpy(dtype=float), f"val/best_{objective} (re-ranked)"


def _baseline_scores(run, objective: str | None) -> dict[str, float]:
    """{baseline name: validation score under ``objective`` (default the sweep's)}, finite ones only."""
    from .baselines import baseline_score

    counts = run.train_counts() if objective not in (None, run.objective) else None
    out = {}
    for name, record in run.baselines.items():
        value = baseline_score(record, objective or run.objective, own_objective=run.objective,
                               train_counts=counts)
        if value is not None and math.isfinite(value):
            out[name] = float(value)
    return out


def _ranked_trials(run, objective: str | None) -> list[str]:
    """Trial ids, best score first (ties: start order), under ``objective`` (default the sweep's)."""
    scores, _ = _scores(run, objective)
    order = [i for i in np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable") if np.isfinite(scores[i])]
    return [run.df["trial_id"].iloc[i] for i in order]


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
    if "val/ci_low" in df:  # the 90% confidence interval of each trial's score (selmix_ray.confidence)
        low, high = df["val/ci_low"].to_numpy(dtype=float), df["val/ci_high"].to_numpy(dtype=float)
        shown = np.isfinite(low) & np.isfinite(high) & np.isfinite(scores)
        if shown.any():
            yerr = np.stack([np.clip(scores - low, 0, None), np.clip(high - scores, 0, None)])[:, shown]
            ax.errorbar(order[shown], scores[shown], yerr=yerr, fmt="none", ecolor="0.55", elinewidth=0.8,
                        capsize=2, label="90% CI", zorder=1)
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


def plot_per_class(run, path: str | os.PathLike, *, top: int = 3, split: str = "test",
                   objective: str | None = None) -> Path:
    """Per-class recall bars of the ``top`` best trials (under ``objective``, default the sweep's) next to the
    starting head; tail classes shaded."""
    trial_ids = None if objective in (None, run.objective) else _ranked_trials(run, objective)[:top]
    table = run.per_class(trial_ids, top=top, split=split, intervals=True)
    labels = [c for c in table.columns if c not in ("band", "train_count") and " - " not in c
              and not c.endswith((" low", " high"))]
    K = len(table)
    width_in = max(7.0, 0.45 * K * max(len(labels), 1) / 2)
    fig = _figure(width_in, 4.5)
    ax = fig.add_subplot()
    width = 0.8 / max(len(labels), 1)
    x = np.arange(K)
    for i, label in enumerate(labels):
        name = f"{label} (reference)" if i == 0 and label in run.baselines else label
        recall = table[label].to_numpy(dtype=float)
        yerr = np.stack([np.clip(recall - table[f"{label} low"].to_numpy(dtype=float), 0, None),
                         np.clip(table[f"{label} high"].to_numpy(dtype=float) - recall, 0, None)])
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, recall, width, label=name, yerr=yerr,
               error_kw={"elinewidth": 0.6, "capsize": 1.5, "ecolor": "0.3"})
    for k in np.flatnonzero((table["band"] == "tail").to_numpy()):
        ax.axvspan(k - 0.5, k + 0.5, color="tab:red", alpha=0.08, linewidth=0)
    ax.set_xticks(x)
    ax.set_xlabel("class (shaded: tail)")
    ax.set_ylabel(f"{split} recall")
    ax.set_ylim(0, 1.05)
    ranked_by = f", best by {objective}" if objective not in (None, run.objective) else ""
    _title(ax, f"{run.name}: per-class {split} recall at each trial's best report{ranked_by}", width_in=width_in - 1.5)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def searched_params(run) -> list[str]:
    """The searched parameters (the manifest's space) that some trial has a value for, in space order."""
    df = run.df
    space = ((run.manifest.get("space") or {}).get("space") or {})
    names = list(space) or sorted(c[len("config/"):] for c in df.columns if c.startswith("config/")
                                  and df[c].nunique(dropna=True) > 1)
    return [p for p in names if f"config/{p}" in df and df[f"config/{p}"].notna().any()]


def plot_objective_vs_params(run, path: str | os.PathLike, *, params: tuple[str, ...] | None = None,
                             objective: str | None = None) -> Path:
    """Validation score against each searched parameter (default: every one, :func:`searched_params`).

    Numbers: a scatter (log x axis for ``loguniform`` and ``log: true`` domains). Choices: a box per
    category and the trials on top (jittered). Colour = method, marker = status; the baselines are
    horizontal lines. Panels of 5 x 4 inches, at most three per row; one legend on the right.
    """
    df = run.df
    names = list(params) if params is not None else searched_params(run)
    present = [p for p in names if f"config/{p}" in df and df[f"config/{p}"].notna().any()]
    if not present:
        raise ExperimentError(f"{run.name} searched none of {', '.join(names) or 'its parameters'}; nothing "
                              "to plot against.")
    scores, label = _scores(run, objective)
    baselines = _baseline_scores(run, objective)
    space = ((run.manifest.get("space") or {}).get("space") or {})
    methods = df["config/method"].fillna("?").astype(str).to_numpy() if "config/method" in df else \
        np.full(len(df), "all")
    colours = {m: METHOD_COLOURS[i % len(METHOD_COLOURS)] for i, m in enumerate(dict.fromkeys(methods))}
    status = df["status"].astype(str).to_numpy()
    columns = min(len(present), 3)
    rows = math.ceil(len(present) / columns)
    fig = _figure(5.0 * columns, 4.0 * rows)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[len(present):]:
        ax.set_visible(False)
    styles = baseline_styles(baselines)
    for ax, param in zip(axes, present):
        values = df[f"config/{param}"]
        domain = space.get(param) if isinstance(space.get(param), dict) else {}
        categorical = "choice" in domain or not all(isinstance(v, (int, float)) for v in values.dropna())
        if categorical:
            _draw_categories(ax, values, scores, methods, status, colours, domain)
        else:
            _draw_numbers(ax, values, scores, methods, status, colours)
            if _log_axis(domain, values.dropna().to_numpy(dtype=float)):
                ax.set_xscale("log")
        for name, value in baselines.items():
            colour, linestyle = styles[name]
            ax.axhline(value, color=colour, linestyle=linestyle, linewidth=1.0, alpha=0.8)
        ax.set_xlabel(param)
        ax.set_ylabel(label, fontsize=8)
    fig.legend(handles=_legend_handles(colours, set(status), styles), fontsize=7, loc="outside right upper")
    _title(fig, f"{run.name}: validation score vs each searched parameter", width_in=5.0 * columns)
    return _save(fig, path)


def _log_axis(domain: dict, values: np.ndarray) -> bool:
    """Log x axis: the domain says so (``loguniform``, ``log: true``); without a domain (an old manifest),
    positive values spanning at least a decade."""
    if domain:
        return "loguniform" in domain or bool(domain.get("log"))
    return bool(len(values)) and values.min() > 0 and values.max() >= 10 * values.min()


def _draw_numbers(ax, values, scores, methods, status, colours) -> None:
    known = values.notna().to_numpy() & np.isfinite(scores)
    x = values.to_numpy(dtype=object)
    for method, colour in colours.items():
        for state, (marker, alpha) in STATUS_MARKERS.items():
            mask = known & (methods == method) & (status == state)
            if mask.any():
                ax.scatter(x[mask].astype(float), scores[mask], s=26, color=colour, marker=marker, alpha=alpha)


def _draw_categories(ax, values, scores, methods, status, colours, domain) -> None:
    known = values.notna().to_numpy() & np.isfinite(scores)
    text = values.astype(str).to_numpy()
    order = [str(c) for c in domain.get("choice", [])] or sorted(set(text[known]))
    order = [c for c in order if (text[known] == c).any()]
    position = {c: i for i, c in enumerate(order)}
    groups = [scores[known & (text == c)] for c in order]
    ax.boxplot(groups, positions=range(len(order)), widths=0.5, showfliers=False,
               medianprops={"color": "black"}, boxprops={"color": "0.5"}, whiskerprops={"color": "0.5"},
               capprops={"color": "0.5"})
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(text))  # fixed: the same picture every time
    for method, colour in colours.items():
        for state, (marker, alpha) in STATUS_MARKERS.items():
            mask = known & (methods == method) & (status == state)
            if mask.any():
                x = np.array([position[c] for c in text[mask]], dtype=float) + jitter[mask]
                ax.scatter(x, scores[mask], s=26, color=colour, marker=marker, alpha=alpha)
    ax.set_xticks(range(len(order)), order, rotation=20 if max(map(len, order), default=0) > 8 else 0, fontsize=8)
    ax.set_xlim(-0.6, len(order) - 0.4)


def _legend_handles(colours, statuses, styles) -> list:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", linestyle="", color=colour, label=method)
               for method, colour in colours.items()]
    handles += [Line2D([], [], marker=marker, linestyle="", color="0.3", alpha=alpha, label=state)
                for state, (marker, alpha) in STATUS_MARKERS.items() if state in statuses]
    handles += [Line2D([], [], color=colour, linestyle=linestyle, label=f"baseline {name}")
                for name, (colour, linestyle) in styles.items()]
    return handles


def plot_pair_distribution(run, path: str | os.PathLike, *, trial_id: str | None = None,
                           objective: str | None = None) -> Path:
    """Heatmap of the pair distribution P (K x K, rows = label class i, columns = partner j) of the best
    ``selmix`` trial (under ``objective``, default the sweep's) at its best report, or of ``trial_id``.

    Other methods' P is uniform (``uniform_mixup``) or absent (``erm``): no selmix trial with a P raises
    ExperimentError (``write_plots`` then leaves the plot out with a log line).
    """
    df = run.df
    if trial_id:
        candidates = [trial_id]
    else:
        selmix = set(df["trial_id"][df["config/method"] == "selmix"]) if "config/method" in df else set(df["trial_id"])
        candidates = [t for t in _ranked_trials(run, objective) if t in selmix]
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
        raise ExperimentError(f"{run.name}: no selmix trial has a pair distribution at its best report "
                              "(uniform_mixup's is uniform and erm has none), so pair_distribution.png is left out.")
    fig = _figure(6.0, 5.0)
    ax = fig.add_subplot()
    image = ax.imshow(P, cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="P[i, j]")
    ax.set_xlabel("partner class j")
    ax.set_ylabel("label class i")
    which = "chosen trial" if trial_id else "best selmix trial" + (f" by {objective}" if objective not in
                                                                      (None, run.objective) else "")
    ax.set_title(f"{run.name}, {which}:\nP of trial {chosen} at its best report", fontsize=TITLE_SIZE)
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


def plot_optuna(run, directory: str | os.PathLike) -> list[Path]:
    """Optuna's matplotlib plots of the experiment's study, written as ``optuna_<plot>.png``; returns them.

    Each of :data:`OPTUNA_PLOTS` that Optuna cannot draw for this study (too few complete trials, no
    intermediate values) is left out with a log line; so are all of them when Optuna's matplotlib support
    does not import. Multi-objective studies are drawn for their first objective.
    """
    try:
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as optuna_plots
    except ImportError as error:
        log(f"Optuna's plots left out: its matplotlib support does not import ({error}).")
        return []
    try:
        study = run.study
    except ExperimentError as error:
        log(f"Optuna's plots left out: {error}")
        return []
    options = {}
    if run.is_multi_objective:
        options = {"target": lambda t: t.values[0], "target_name": run.objectives[0]}
    written = []
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in OPTUNA_PLOTS:
        plot = getattr(optuna_plots, f"plot_{name}")
        kwargs = {} if name == "intermediate_values" else options
        try:
            with warnings.catch_warnings():  # "experimental" and "few trials per regime" notes: not the user's
                warnings.simplefilter("ignore")
                result = plot(study, **kwargs)
        except (ValueError, RuntimeError, ZeroDivisionError) as error:
            log(f"optuna_{name}.png left out: {error}")
            continue
        axes = np.ravel(result)
        fig = axes[0].figure
        try:
            if not any(ax.has_data() for ax in axes):
                log(f"optuna_{name}.png left out: Optuna drew nothing (no trial with data for it).")
                continue
            fig.set_size_inches(max(fig.get_size_inches()[0], 7.0), max(fig.get_size_inches()[1], 4.5))
            fig.savefig(directory / f"optuna_{name}.png", format="png", dpi=100, bbox_inches="tight")
            written.append(directory / f"optuna_{name}.png")
        finally:
            plt.close(fig)
    return written


def write_plots(run, directory: str | os.PathLike, *, objective: str | None = None, optuna: bool = False
                ) -> list[Path]:
    """Write every plot that applies to ``run`` into ``directory``; returns the written paths.

    ``objective``: rank and score trials by it (re-ranked from the stored counts); default the sweep's.
    ``optuna``: also Optuna's own plots of the study (:func:`plot_optuna`; imports Optuna, so off by
    default here; the CLI turns it on). A plot that does not apply
    (no searched parameter, no selmix P, single objective, no trial reported yet) is left out rather than
    drawn empty, with a log line saying why.
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
    for plotter, filename in plotters:
        try:
            written.append(plotter(run, directory / filename, objective=objective))
        except ExperimentError as error:
            log(f"{filename} left out: {error}")
    if run.is_multi_objective:
        plotters = [(plot_pareto, "pareto.png")]
    else:
        plotters = []
    for plotter, filename in plotters:
        try:
            written.append(plotter(run, directory / filename))
        except ExperimentError as error:
            log(f"{filename} left out: {error}")
    if optuna:
        written.extend(plot_optuna(run, directory))
    return written
