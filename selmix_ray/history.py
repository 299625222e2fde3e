"""A trial's history: its report records, their sparse confusion counts and the best-report rule.

numpy only: the engine writes it, the baselines summarise it and ``results`` reads it without torch.

One record per report::

    {"step": int, "metrics": {key: float}, "val": split, "test": split}   (+ "val_raw", "test_raw")

where a split is ``{"recall": [K floats], "counts": [[row, col, count], ...]}``: the nonzero entries of
the (K, K) confusion counts, rows = true class, columns = predicted class (cross-fitted validation
counts may be fractional). The best report is the one at ``best_step`` (the report where
``val/best_objective`` was reached); a history without one uses its last report.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["History", "sparse_counts", "dense_counts", "pooled_best_counts", "mean_best_recall"]


@dataclass
class History:
    """What a trial reports (plain JSON through ``to_json``/``from_json``).

    Attributes:
        records: one dict per report (module docstring).
        best_p: (K, K) float32, the pair distribution P in force at the best report so far (None for
            ``erm`` or before the first report).
        best_step: the step of the best report so far (the one ``test_at_best/*`` come from).
        meta: config, n_classes, train_counts (head/tail), the effective learning rate and the device.
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    best_p: np.ndarray | None = None
    best_step: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> list[dict[str, float]]:
        """The reported scalars, one dict per report."""
        return [record["metrics"] for record in self.records]

    @property
    def n_classes(self) -> int:
        return int(self.meta["n_classes"])

    @property
    def steps(self) -> list[int]:
        return [int(record["step"]) for record in self.records]

    @property
    def train_counts(self) -> np.ndarray | None:
        """(K,) training counts per class (they define head and tail), if recorded."""
        counts = self.meta.get("train_counts")
        return None if counts is None else np.asarray(counts)

    def best_index(self) -> int:
        """Index of the best report: the one at ``best_step``, else the last."""
        steps = self.steps
        if self.best_step is not None and self.best_step in steps:
            return steps.index(self.best_step)
        return len(steps) - 1

    def index_of_step(self, step: int) -> int:
        from .errors import ExperimentError

        steps = self.steps
        if step not in steps:
            raise ExperimentError(f"the history has no report at step {step}; it has {steps}.")
        return steps.index(step)

    def confusion(self, index: int = -1, split: str = "val") -> np.ndarray:
        """Dense (K, K) confusion counts of report ``index`` for ``split`` (val, test, val_raw, test_raw)."""
        return dense_counts(self.records[index][split]["counts"], self.n_classes)

    def recall(self, index: int = -1, split: str = "test") -> np.ndarray:
        """(K,) per-class recall of report ``index`` for ``split``."""
        return np.asarray(self.records[index][split]["recall"], dtype=float)

    def to_dict(self) -> dict[str, Any]:
        best_p = None
        if self.best_p is not None:
            p = np.ascontiguousarray(self.best_p, dtype=np.float32)
            best_p = {"dtype": "float32", "shape": list(p.shape), "base64": base64.b64encode(p.tobytes()).decode()}
        return {"records": self.records, "best_p": best_p, "best_step": self.best_step, "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        best_p = data.get("best_p")
        if best_p is not None:
            raw = base64.b64decode(best_p["base64"])
            best_p = np.frombuffer(raw, dtype=np.float32).reshape(best_p["shape"]).copy()
        return cls(records=data["records"], best_p=best_p, best_step=data.get("best_step"),
                   meta=data.get("meta", {}))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> History:
        return cls.from_dict(json.loads(text))


def sparse_counts(counts: np.ndarray) -> list[list]:
    """Nonzero entries of a (K, K) confusion as [row, col, count] (ints where the counts are integral)."""
    counts = np.asarray(counts)
    rows, cols = np.nonzero(counts)
    values = counts[rows, cols]
    cast = int if np.all(values == np.round(values)) else float
    return [[int(r), int(c), cast(v)] for r, c, v in zip(rows, cols, values)]


def dense_counts(entries: list[list], n_classes: int) -> np.ndarray:
    """(K, K) float confusion counts from the [row, col, count] entries of :func:`sparse_counts`."""
    dense = np.zeros((n_classes, n_classes))
    for row, col, count in entries:
        dense[row, col] = count
    return dense


def pooled_best_counts(histories: list[History]) -> dict[str, dict[str, list]]:
    """``{"val": {"counts": ...}, "test": {"counts": ...}}``: sparse confusion counts at each copy's best
    report, summed over the copies (so a re-ranking scores the pooled predictions)."""
    out = {}
    for split in ("val", "test"):
        dense = sum(history.confusion(history.best_index(), split) for history in histories)
        out[split] = {"counts": sparse_counts(dense)}
    return out


def mean_best_recall(histories: list[History]) -> dict[str, list[float]]:
    """``{"val": [K], "test": [K]}``: per-class recall at each copy's best report, averaged over copies."""
    return {split: np.mean([h.recall(h.best_index(), split) for h in histories], axis=0).tolist()
            for split in ("val", "test")}
