"""Baselines of a sweep: what the trials are compared with, computed once on the driver and read back.

``compute_baselines`` fine-tunes, with the sweep's fixed values and objective, each of :data:`BASELINES`
(the starting head, its post-hoc corrections, plain ERM fine-tuning, uniform mixup) on the CPU, before any
trial, and returns the record ``search`` writes to ``baselines.json``::

    {"format": 3, "feature_key": ..., "repeats": r, "val_labels": encoded, "test_labels": encoded,
     "baselines": {name: record}}
    record = {"config", "metrics" (the last report), "n_classes", "per_class_recall": {"val": [K], "test": [K]},
              "val": {"counts": sparse}, "test": {"counts": sparse},   (history.sparse_counts's form)
              "val_predictions": encoded, "test_predictions": encoded, "seconds"}

where the counts are the confusion counts at each copy's best report, summed over the ``r`` copies
(``history.pooled_best_counts``), ``*_predictions`` the (r, n_val) / (r, n_test) predicted class of every
image at each copy's best report (row r reproduces copy r's counts; summed over rows, the stored counts)
and ``*_labels`` the (n_val,) / (n_test,) true classes, once for the file; all four in the FeatureSet's
order of the split and in ``history.encode_predictions``'s form. Format 2 files (no predictions or
labels) still load: the readers return None for what is missing. Results are cached per feature key and
settings under ``<cache>/baselines/``, so a second sweep on the same features starts at once (a cached
format 2 entry has another key: it is recomputed once, with predictions).

The readers (:func:`baseline_row`, :func:`baseline_score`, :func:`baseline_recall`) take one record
(also older layouts: flat metrics, or a ``records`` list of history records) and use numpy only.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .checks import is_number
from .constants import METRIC_NAMES, SCORE_KEY
from .errors import SelMixError
from .history import (
    counts_classes,
    decode_predictions,
    dense_counts,
    encode_predictions,
    mean_best_recall,
    pooled_best_counts,
    split_recall,
)

__all__ = ["BASELINES", "BASELINE_FORMAT", "compute_baselines", "baseline_row", "baseline_score",
           "baseline_recall", "baseline_predictions", "stored_labels"]

BASELINES = {  # name -> overrides of the sweep's fixed values (steps = 0 is the starting head)
    "start": {"method": "erm", "steps": 0, "posthoc": "none"},
    "start+logit_adjust": {"method": "erm", "steps": 0, "posthoc": "logit_adjust"},
    "start+class_weights": {"method": "erm", "steps": 0, "posthoc": "class_weights"},
    "erm": {"method": "erm", "posthoc": "none"},
    "uniform_mixup": {"method": "uniform_mixup", "posthoc": "none"},
}
BASELINE_FORMAT = 3  # 2: each baseline holds its val/test counts at the best report; 3: + per-image predictions
REFERENCE = "start"  # the baseline that per-class differences are taken from by default


# -- computing -----------------------------------------------------------------------------------------


def compute_baselines(features, search_space, *, repeats: int, seed: int,
                      log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the baselines on the driver (CPU); cached per feature key and settings.

    Args:
        features: the sweep's FeatureSet.
        search_space: its SearchSpace (objective and fixed values).
        repeats, seed: as the sweep's (copies use seed ... seed + repeats - 1).
        log: called with one line per baseline (and for a cache hit); default: silent.
    """
    from .config import FinetuneConfig
    from .engine import finetune, finetune_repeats

    log = log or (lambda message: None)
    base = {"objective": search_space.objective, **search_space.fixed, "seed": seed, "device": "cpu"}
    configs = {name: FinetuneConfig.from_dict({**base, **overrides}) for name, overrides in BASELINES.items()}
    digest = hashlib.sha256(json.dumps(
        {"format": BASELINE_FORMAT, "configs": {k: c.to_dict() for k, c in configs.items()}, "repeats": repeats},
        sort_keys=True).encode()).hexdigest()[:16]
    cache_file = _cache_dir() / f"{features.key or 'nokey'}-{digest}.json"
    if features.key and cache_file.exists():
        log(f"baselines: cached ({cache_file})")
        return json.loads(cache_file.read_text(encoding="utf-8"))

    out: dict[str, Any] = {"format": BASELINE_FORMAT, "feature_key": features.key, "repeats": repeats,
                           "val_labels": encode_predictions(features.val.y),
                           "test_labels": encode_predictions(features.test.y), "baselines": {}}
    for name, config in configs.items():
        started = time.perf_counter()
        reports: list[dict[str, float]] = []
        if repeats == 1:
            histories = [finetune(features, config, report=reports.append)]
        else:
            histories = finetune_repeats(features, config, repeats=repeats, report=reports.append)
        out["baselines"][name] = {
            "config": config.to_dict(),
            "metrics": reports[-1],
            "n_classes": features.n_classes,
            "per_class_recall": mean_best_recall(histories),
            **pooled_best_counts(histories),
            **_best_predictions(histories),
            "seconds": round(time.perf_counter() - started, 3),
        }
        log(f"baseline {name:<20s} {SCORE_KEY}={reports[-1][SCORE_KEY]:.4f} "
            f"test_at_best/{search_space.objective}={reports[-1].get('test_at_best/objective', float('nan')):.4f}")
    if features.key:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(out), encoding="utf-8")
        except OSError:
            pass  # a read-only cache only costs recomputation
    return out


def _best_predictions(histories) -> dict[str, Any]:
    """``{"val_predictions": ..., "test_predictions": ...}``: each copy's per-image predictions at its best
    report, stacked (repeats, n) and encoded."""
    return {f"{split}_predictions": encode_predictions(np.stack([getattr(h, f"best_{split}_predictions")
                                                                 for h in histories]))
            for split in ("val", "test")}


def _cache_dir() -> Path:
    from .features import default_cache_dir

    return Path(default_cache_dir()) / "baselines"


# -- reading one record --------------------------------------------------------------------------------


def baseline_row(name: str, record: dict[str, Any]) -> dict[str, Any]:
    """The baseline as a table row: name, kind "baseline", its score and its test metrics at its best report."""
    metrics = _flat_metrics(record)
    row: dict[str, Any] = {"name": name, "kind": "baseline"}
    row[SCORE_KEY] = metrics.get(SCORE_KEY, metrics.get("val/objective"))
    for m in METRIC_NAMES:
        row[f"test_at_best/{m}"] = metrics.get(f"test_at_best/{m}", metrics.get(f"test/{m}"))
    return row


def baseline_score(record: dict[str, Any], objective: str, *, own_objective: str,
                   train_counts: np.ndarray | None) -> float | None:
    """A baseline's validation score under ``objective``: stored scalars, else its stored val counts.

    ``own_objective`` is the sweep's (its ``val/best_objective`` is stored); ``train_counts`` (K,) the
    training counts that head/tail objectives need. None when nothing stored gives the score.
    """
    metrics = _flat_metrics(record)
    if objective == own_objective:
        value = metrics.get(SCORE_KEY, metrics.get("val/objective"))
        if value is not None:
            return value
    if f"val/{objective}" in metrics:
        return metrics[f"val/{objective}"]
    counts = _find_counts(record, "val")
    if counts is None:
        return None
    from .metrics import joint_confusion
    from .objectives import get_objective

    try:
        scorer = get_objective(objective, train_counts=train_counts)
        return float(scorer.value(joint_confusion(counts)))
    except SelMixError:
        return None


def baseline_recall(record: dict[str, Any], split: str) -> np.ndarray | None:
    """(K,) per-class recall of ``split`` at the baseline's best report, or None when not stored."""
    per_class = record.get("per_class_recall")  # what compute_baselines writes: {"val": [K], "test": [K]}
    if isinstance(per_class, dict) and isinstance(per_class.get(split), list):
        return np.asarray(per_class[split], dtype=float)
    part = _find_split(record, split)
    if part is not None and isinstance(part.get("recall"), (list, dict)):
        return split_recall(part)
    return None


def baseline_predictions(record: dict[str, Any], split: str = "val") -> np.ndarray | None:
    """(repeats, n) int64 predicted class of every ``split`` image at each copy's best report, or None when
    the record predates them (format 2 and older)."""
    encoded = record.get(f"{split}_predictions")
    return None if not isinstance(encoded, dict) else decode_predictions(encoded)


def stored_labels(baselines_file: dict[str, Any], split: str = "val") -> np.ndarray | None:
    """(n,) int64 true classes of ``split`` from a whole ``baselines.json`` (not one record), or None when
    the file predates them (format 2 and older)."""
    encoded = baselines_file.get(f"{split}_labels")
    return None if not isinstance(encoded, dict) else decode_predictions(encoded)


def _flat_metrics(record: dict[str, Any]) -> dict[str, Any]:
    metrics = record.get("metrics") if isinstance(record.get("metrics"), dict) else record
    return {k: v for k, v in metrics.items() if is_number(v)}


def _find_split(record: dict[str, Any], split: str) -> dict[str, Any] | None:
    if isinstance(record.get(split), dict):
        return record[split]
    records = record.get("records")
    if isinstance(records, list) and records and isinstance(records[-1].get(split), dict):
        return records[-1][split]
    return None


def _find_counts(record: dict[str, Any], split: str) -> np.ndarray | None:
    part = _find_split(record, split)
    if part is None or "counts" not in part:
        return None
    entries = part["counts"]
    return dense_counts(entries, int(record.get("n_classes") or counts_classes(entries)))
