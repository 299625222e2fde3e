"""Write a small selmix-ray experiment folder by hand, without Ray or training (tests and benchmarks).

The files are the ones ``results.load_run`` reads, in the layout a sweep writes: ``selmix_run.json``,
``baselines.json`` (format 3 with labels and per-image predictions, or format 2 without), and one folder per
trial with ``params.json``, ``result.json`` and ``checkpoint_000000/history.json``. Every trial and baseline
is given by its per-image predictions on fixed validation and test images, so a test knows the truth behind
every stored count and can bootstrap images itself.

    labels = balanced_labels(K=4, per_class=50)
    write_experiment(path, val_labels=labels, test_labels=labels,
                     trials={"t1": [(val_pred, test_pred)]}, baselines={"start": (val_pred, test_pred)})
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from selmix_ray.constants import BASELINES_FILE, HISTORY_FILE, MANIFEST_FILE, SCORE_KEY
from selmix_ray.history import encode_predictions, sparse_counts
from selmix_ray.metrics import confusion_counts, head_mask, joint_confusion, metric_values
from selmix_ray.objectives import get_objective


def balanced_labels(K: int, per_class: int, *, seed: int = 0) -> np.ndarray:
    """(K * per_class,) true classes in a shuffled order (as the digits split)."""
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(K), per_class))


def predictions(labels: np.ndarray, recall, *, seed: int = 0) -> np.ndarray:
    """Predictions with exactly round(recall_k * n_k) right in class k (the first ones), the rest wrong."""
    rng = np.random.default_rng(seed)
    K = int(labels.max()) + 1
    out = labels.copy()
    for k, r in enumerate(np.broadcast_to(np.asarray(recall, dtype=float), (K,))):
        members = np.flatnonzero(labels == k)
        wrong = members[int(round(r * members.size)):]
        out[wrong] = (k + rng.integers(1, K, wrong.size)) % K
    return out


def _split(labels, pred, K) -> dict:
    counts = confusion_counts(labels, pred, K)
    return {"counts": sparse_counts(counts), "recall": (np.diag(counts) / counts.sum(axis=1)).tolist()}


def _trial(folder: Path, trial_id: str, reports, val_labels, test_labels, K, objective, steps_each, index,
           with_predictions) -> None:
    scorer = get_objective(objective)
    records, values = [], []
    for r, (val_pred, test_pred) in enumerate(reports):
        val, test = _split(val_labels, val_pred, K), _split(test_labels, test_pred, K)
        value = float(scorer.value(joint_confusion(confusion_counts(val_labels, val_pred, K))))
        values.append(value)
        records.append({"step": (r + 1) * steps_each, "metrics": {"val/objective": value}, "val": val, "test": test})
    best = int(np.argmax(values))
    history = {"records": records, "best_p": None, "best_step": records[best]["step"],
               "meta": {"n_classes": K, "train_counts": None}}
    if with_predictions:
        history["best_val_predictions"] = encode_predictions(reports[best][0])
        history["best_test_predictions"] = encode_predictions(reports[best][1])
    folder.mkdir(parents=True)
    (folder / "checkpoint_000000").mkdir()
    (folder / "checkpoint_000000" / HISTORY_FILE).write_text(json.dumps(history))
    (folder / "params.json").write_text(json.dumps({"method": "selmix", "s": float(index + 1),
                                                    "steps": len(reports) * steps_each}))
    C = joint_confusion(confusion_counts(test_labels, reports[best][1], K))
    tests = {**metric_values(C, head_mask(None, K)), "objective": float(scorer.value(C))}
    result = {"trial_id": trial_id, "step": len(reports) * steps_each, SCORE_KEY: values[best],
              "time_total_s": 1.0, "timestamp": 1_700_000_000 + index,
              **{f"test_at_best/{name}": value for name, value in tests.items()}}
    (folder / "result.json").write_text(json.dumps(result) + "\n")


def write_experiment(path, *, val_labels, test_labels, trials: dict, baselines: dict | None = None,
                     objective: str = "min_recall", select: str | None = None, with_predictions: bool = True,
                     steps_each: int = 10) -> Path:
    """An experiment folder at ``path`` (created).

    Args:
        trials: trial id -> list of reports, each (val predictions, test predictions); the best report is the
            one with the highest validation objective (the first on ties).
        baselines: name -> (val predictions, test predictions).
        select: written to the manifest when given (older manifests have no ``select``).
        with_predictions: False writes what experiments older than per-image predictions hold: histories
            without them and a format 2 baselines.json without labels.
    """
    path = Path(path)
    path.mkdir(parents=True)
    val_labels, test_labels = np.asarray(val_labels), np.asarray(test_labels)
    K = int(val_labels.max()) + 1
    steps = max(len(reports) for reports in trials.values()) * steps_each
    manifest = {"format": 1, "name": path.name, "objectives": [objective], "metrics": [SCORE_KEY], "mode": "max",
                "space": {"objective": objective, "space": {}, "fixed": {"steps": steps}}, "n_classes": K}
    if select is not None:
        manifest["select"] = select
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    for index, (trial_id, reports) in enumerate(trials.items()):
        _trial(path / f"run_trial_{trial_id}_{index}", trial_id, reports, val_labels, test_labels, K, objective,
               steps_each, index, with_predictions)
    if baselines:
        scorer = get_objective(objective)
        records = {}
        for name, (val_pred, test_pred) in baselines.items():
            value = float(scorer.value(joint_confusion(confusion_counts(val_labels, val_pred, K))))
            val, test = _split(val_labels, val_pred, K), _split(test_labels, test_pred, K)
            record = {"metrics": {SCORE_KEY: value}, "n_classes": K, "val": {"counts": val["counts"]},
                      "test": {"counts": test["counts"]},
                      "per_class_recall": {"val": val["recall"], "test": test["recall"]}}
            if with_predictions:
                record["val_predictions"] = encode_predictions(val_pred[None])
                record["test_predictions"] = encode_predictions(test_pred[None])
            records[name] = record
        data = {"format": 3 if with_predictions else 2, "repeats": 1, "baselines": records}
        if with_predictions:
            data["val_labels"], data["test_labels"] = encode_predictions(val_labels), encode_predictions(test_labels)
        (path / BASELINES_FILE).write_text(json.dumps(data))
    return path
