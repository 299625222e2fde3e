"""Plots of real (small) sweeps: every plot function writes a PNG of the figure's size, and what it draws is
the experiment's data, read here independently from the files Tune and the trials wrote.

The figures are caught on their way to ``plots._save`` (the PNG is still written), so that the drawn
points, lines, bars and images can be compared with the expected values.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import trial_results

from selmix_ray import plots
from selmix_ray.constants import BASELINES_FILE, HISTORY_FILE, MANIFEST_FILE, SCORE_KEY
from selmix_ray.errors import ExperimentError
from selmix_ray.history import decode_array, split_recall
from selmix_ray.results import load_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def drawn(monkeypatch):
    """{file name: Figure} of every figure a plot function saves during the test."""
    figures = {}
    save = plots._save

    def capture(fig, path):
        figures[Path(path).name] = fig
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", capture)
    return figures


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels of a PNG file, from its IHDR header."""
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC), path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _last_reports(experiment: Path) -> dict[str, dict]:
    """trial_id -> the last result.json record of every trial folder."""
    out = {}
    for folder in experiment.iterdir():
        if (folder / "result.json").is_file():
            last = trial_results(folder)[-1]
            out[last["trial_id"]] = {**last, "params": json.loads((folder / "params.json").read_text()),
                                     "folder": folder}
    return out


def _ranked(reports: dict[str, dict]) -> list[str]:
    """Trial ids best score first; ties in start order (as Run.df ranks them)."""
    return sorted(reports, key=lambda t: (-reports[t][SCORE_KEY], _start(reports[t])))


def _start(report: dict) -> float:
    return report["timestamp"] - report["time_total_s"]


def _points(ax) -> np.ndarray:
    """(n, 2) every scatter point of an axes (error bars, LineCollections, are not points)."""
    from matplotlib.collections import LineCollection

    return np.concatenate([np.asarray(c.get_offsets(), dtype=float) for c in ax.collections
                           if not isinstance(c, LineCollection)])


@pytest.mark.slow
def test_history_draws_every_trials_score_the_running_best_and_the_baselines(sweep, drawn, tmp_path):
    run = load_run(sweep)
    path = plots.plot_history(run, tmp_path / "h.png")
    assert _png_size(path) == (850, 450)
    (ax,) = drawn["h.png"].axes
    points = _points(ax)
    points = points[np.argsort(points[:, 0])]
    reports = _last_reports(sweep)
    # Trials in start order (start = timestamp - time_total_s of the last report), each at its score.
    order = sorted(reports, key=lambda t: _start(reports[t]))
    expected = [reports[t][SCORE_KEY] for t in order]
    np.testing.assert_array_equal(points[:, 0], np.arange(len(order)))
    np.testing.assert_allclose(points[:, 1], expected, rtol=0, atol=1e-12)
    best = next(line for line in ax.lines if line.get_label() == "best so far")
    np.testing.assert_allclose(best.get_ydata(), np.maximum.accumulate(expected), rtol=0, atol=1e-12)
    stored = json.loads((sweep / BASELINES_FILE).read_text())["baselines"]
    lines = {line.get_label(): line.get_ydata()[0] for line in ax.lines if line.get_label().startswith("baseline ")}
    assert lines == pytest.approx({f"baseline {name}": record["metrics"][SCORE_KEY]
                                   for name, record in stored.items()}, abs=1e-12)


@pytest.mark.slow
def test_per_class_draws_the_reference_and_the_best_trials_recall_with_the_tail_shaded(sweep, drawn, tmp_path):
    run = load_run(sweep)
    path = plots.plot_per_class(run, tmp_path / "pc.png", top=2)
    width, height = _png_size(path)
    assert width >= 700 and height == 450
    (ax,) = drawn["pc.png"].axes
    from matplotlib.container import BarContainer

    bar_containers = [c for c in ax.containers if isinstance(c, BarContainer)]  # not the error bars
    labels = [c.get_label() for c in bar_containers]
    reports = _last_reports(sweep)
    best_two = _ranked(reports)[:2]
    assert labels == ["start (reference)", *best_two]
    stored = json.loads((sweep / BASELINES_FILE).read_text())["baselines"]["start"]
    np.testing.assert_allclose([b.get_height() for b in bar_containers[0]], stored["per_class_recall"]["test"])
    for trial_id, container in zip(best_two, bar_containers[1:]):  # recall of the report at its best step
        history = json.loads(sorted(reports[trial_id]["folder"].glob("checkpoint_*"))[-1].joinpath(
            HISTORY_FILE).read_text())
        record = next(r for r in history["records"] if r["step"] == history["best_step"])
        np.testing.assert_allclose([b.get_height() for b in container], split_recall(record["test"]))
    # One shaded span per tail class: the classes outside the floor(0.9 K) largest by training count.
    counts = np.asarray(json.loads((sweep / MANIFEST_FILE).read_text())["train_counts"])
    bars = {id(b) for c in bar_containers for b in c}
    spans = [p for p in ax.patches if id(p) not in bars]
    assert len(spans) == len(counts) - int(0.9 * len(counts)) == 1
    tail_class = int(np.argmin(counts))
    assert spans[0].get_x() == pytest.approx(tail_class - 0.5)


@pytest.mark.slow
def test_objective_vs_params_draws_each_searched_parameter_against_the_score(sweep, drawn, tmp_path):
    run = load_run(sweep)
    path = plots.plot_objective_vs_params(run, tmp_path / "p.png", params=("s", "refresh_every"))
    assert _png_size(path) == (1000, 400)  # two panels of 5 x 4 inches
    axes = drawn["p.png"].axes
    assert [ax.get_xlabel() for ax in axes] == ["s", "refresh_every"]
    reports = _last_reports(sweep).values()
    for ax in axes:
        assert ax.get_xscale() == "log"
        expected = sorted((r["params"][ax.get_xlabel()], r[SCORE_KEY]) for r in reports
                          if ax.get_xlabel() in r["params"])
        np.testing.assert_allclose(sorted(map(tuple, _points(ax).tolist())), expected, rtol=0, atol=1e-12)
    with pytest.raises(ExperimentError, match="searched none of"):
        plots.plot_objective_vs_params(run, tmp_path / "q.png", params=("weight_decay",))


@pytest.mark.slow
def test_pair_distribution_draws_P_of_the_best_trial_that_has_one(sweep, drawn, tmp_path):
    run = load_run(sweep)
    path = plots.plot_pair_distribution(run, tmp_path / "P.png")
    assert _png_size(path) == (600, 500)
    ax = drawn["P.png"].axes[0]
    reports = _last_reports(sweep)
    for trial_id in [t for t in _ranked(reports) if reports[t]["params"]["method"] == "selmix"]:  # best first
        newest = sorted(reports[trial_id]["folder"].glob("checkpoint_*"))[-1]
        best_p = json.loads((newest / HISTORY_FILE).read_text())["best_p"]
        if best_p is not None:
            break
    expected = decode_array(best_p).astype(np.float32)  # the compact form (history.encode_array)
    assert ax.get_title().endswith(f"P of trial {trial_id} at its best report")
    np.testing.assert_array_equal(ax.images[0].get_array(), expected)
    assert expected.shape == (10, 10) and expected.std() > 0


@pytest.mark.slow
def test_pareto_draws_every_trial_and_joins_the_non_dominated_ones(multi_sweep, sweep, drawn, tmp_path):
    run = load_run(multi_sweep)
    path = plots.plot_pareto(run, tmp_path / "front.png")
    assert _png_size(path) == (600, 500)
    (ax,) = drawn["front.png"].axes
    finals = [(r[SCORE_KEY], r["val/mean_recall"]) for r in _last_reports(multi_sweep).values()]
    np.testing.assert_allclose(sorted(map(tuple, _points(ax).tolist())), sorted(finals), rtol=0, atol=1e-12)
    front = sorted(p for p in finals if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in finals))
    (line,) = [line for line in ax.lines if line.get_label() == "Pareto front"]
    np.testing.assert_allclose(np.column_stack([line.get_xdata(), line.get_ydata()]), front, rtol=0, atol=1e-12)
    with pytest.raises(ExperimentError, match="not a multi-objective sweep"):
        plots.plot_pareto(load_run(sweep), tmp_path / "none.png")


def test_write_plots_writes_nothing_for_an_experiment_without_reports(tmp_path):
    experiment = tmp_path / "empty"
    experiment.mkdir()
    (experiment / MANIFEST_FILE).write_text(json.dumps({"format": 1, "name": "empty", "objectives": ["gmean"]}))
    assert plots.write_plots(load_run(experiment), tmp_path / "plots") == []
    assert not (tmp_path / "plots").exists()


def _marker_of(collection) -> str:
    """The marker name a scatter collection was drawn with ('o', 'x', ...), read back from its path."""
    from matplotlib.markers import MarkerStyle

    path = collection.get_paths()[0]
    for name in ("o", "x", "s", "^"):
        style = MarkerStyle(name)
        vertices = style.get_path().transformed(style.get_transform()).vertices
        if vertices.shape == path.vertices.shape and np.allclose(vertices, path.vertices):
            return name
    return "?"


@pytest.mark.slow
def test_objective_vs_params_draws_every_searched_parameter_with_status_markers(sweep, drawn, tmp_path):
    """Every parameter of the space, choices as categories; pruned trials as 'x', complete as 'o'; one
    distinct (colour, linestyle) per baseline, at its stored score."""
    run = load_run(sweep)
    plots.plot_objective_vs_params(run, tmp_path / "all.png")
    fig = drawn["all.png"]
    axes = [ax for ax in fig.axes if ax.get_visible()]
    space = json.loads((sweep / MANIFEST_FILE).read_text())["space"]["space"]
    assert [ax.get_xlabel() for ax in axes] == list(space) and len(space) == 5  # lr, method, posthoc, ...
    reports = _last_reports(sweep)
    status = {t: ("complete" if r["step"] >= 60 else "pruned") for t, r in reports.items()}
    for ax in axes:
        param = ax.get_xlabel()
        if "choice" in space[param]:
            names = [t.get_text() for t in ax.get_xticklabels()]
            assert set(names) == {str(r["params"][param]) for r in reports.values() if param in r["params"]}
            # each point sits within 0.15 of its category's tick, at its score
            got = sorted((names[round(x)], y) for x, y in _points(ax).tolist())
            want = sorted((str(r["params"][param]), r[SCORE_KEY]) for r in reports.values() if param in r["params"])
            assert [g[0] for g in got] == [w[0] for w in want]
            np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], rtol=0, atol=1e-12)
        by_marker = {}
        for collection in ax.collections:
            by_marker.setdefault(_marker_of(collection), []).extend(np.asarray(collection.get_offsets())[:, 1])
        for marker, state in (("o", "complete"), ("x", "pruned")):
            expected = sorted(r[SCORE_KEY] for t, r in reports.items() if status[t] == state and param in r["params"])
            np.testing.assert_allclose(sorted(by_marker.get(marker, [])), expected, rtol=0, atol=1e-12)
    stored = json.loads((sweep / BASELINES_FILE).read_text())["baselines"]
    lines = [line for line in axes[0].lines if len(set(line.get_ydata())) == 1 and len(line.get_xdata()) == 2
             and line.get_linestyle() != "-"]
    assert sorted(line.get_ydata()[0] for line in lines) == pytest.approx(
        sorted(record["metrics"][SCORE_KEY] for record in stored.values()), abs=1e-12)
    styles = {(line.get_color(), line.get_linestyle()) for line in lines}
    assert len(styles) == len(stored) == len({c for c, _ in styles})  # distinct colours and pairs
    legend = {t.get_text() for t in fig.legends[0].get_texts()}
    assert {"complete", "pruned", *(f"baseline {n}" for n in stored)} <= legend


@pytest.mark.slow
def test_objective_option_rescores_the_points(sweep, drawn, tmp_path):
    run = load_run(sweep)
    plots.plot_objective_vs_params(run, tmp_path / "g.png", params=("lr",), objective="gmean")
    (ax,) = [ax for ax in drawn["g.png"].axes if ax.get_visible()]
    ranked = run.rerank("gmean").set_index("trial_id")["val/best_gmean"]
    reports = _last_reports(sweep)
    expected = sorted((r["params"]["lr"], ranked[t]) for t, r in reports.items())
    np.testing.assert_allclose(sorted(map(tuple, _points(ax).tolist())), expected, rtol=0, atol=1e-12)
    assert "gmean" in ax.get_ylabel()


@pytest.mark.slow
def test_write_plots_adds_optunas_own_plots(sweep, tmp_path):
    """README: the plots written beside ours; each a PNG Optuna drew something in."""
    written = {p.name for p in plots.write_plots(load_run(sweep), tmp_path / "plots", optuna=True)}
    assert {f"optuna_{name}.png" for name in plots.OPTUNA_PLOTS} <= written
    assert {"history.png", "objective_vs_params.png", "per_class_recall.png"} <= written
    for name in written:
        width, height = _png_size(tmp_path / "plots" / name)
        assert width >= 300 and height >= 200


def test_titles_are_wrapped_to_the_figure_width():
    fig = plots._figure(5.0, 4.0)
    ax = fig.add_subplot()
    plots._title(ax, "a-very-long-experiment-name-with-a-date-20260101-120000: per-class test recall at each "
                     "trial's best report, best by gmean", width_in=5.0)
    lines = ax.get_title().splitlines()
    assert len(lines) >= 2 and all(len(line) <= 5.0 * plots.TITLE_CHARS_PER_INCH for line in lines)
    fig.canvas.draw()  # the wrapped title fits inside the figure
    box = ax.title.get_window_extent()
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width
