"""A trial's history: its report records, their sparse confusion counts and the best-report rule.

numpy only: the engine writes it, the baselines summarise it and ``results`` reads it without torch.

One record per report::

    {"step": int, "metrics": {key: float}, "val": split, "test": split}   (+ "val_raw", "test_raw")

where a split is ``{"recall": recall, "counts": counts}``: the per-class recall (K,) and the (K, K)
confusion counts, rows = true class, columns = predicted class (cross-fitted validation counts and counts
pooled over repeats may be fractional). Both are stored compactly, since at K = 1000 a report's counts as
JSON lists took hundreds of kB and every checkpoint holds the whole history::

    recall = {"dtype": "float64", "shape": [K], "zlib_base64": str}           (the exact float64 values)
    counts = {"coo": "delta-zlib", "shape": [K, K], "index": ints, "values": ints or floats}

where ``index`` holds the positions ``row * K + col`` of the nonzero counts in increasing order as their
differences (the first from 0), and ``values`` the counts there, each array in :func:`encode_array`'s form.
Histories written before (``recall`` a list of K floats, ``counts`` a list of ``[row, col, count]``) read
the same: :func:`dense_counts` and :func:`split_recall` are the one decoder of both forms, used by the
accessors here, the baselines and the results. The best report is the one at ``best_step`` (the report
where ``val/best_objective`` was reached); a history without one uses its last report. ``best_p`` is
stored in the same compressed form (older histories: ``{"dtype", "shape", "base64"}``, read the same).

Per-image predictions at the best report (``best_val_predictions``, ``best_test_predictions``): the class
each validation (test) image was given at that report, in the FeatureSet's order of that split
(``features.val.y``; for the bundled data sets the images sorted by their index in the source data, which
groups them by class for ``mnist`` and not for ``digits``). They are the predictions behind the split's stored counts: ``"val"`` with a
post-hoc correction is the cross-fitted prediction (each image predicted by the correction fitted on the
other half), ``"test"`` the correction fitted on all of validation. So
``confusion_counts(features.val.y, best_val_predictions, K)`` equals the best record's ``"val"`` counts.
They let a trial and a baseline be compared paired, image by image (:mod:`selmix_ray.pairing`). In the
JSON (:func:`encode_predictions`)::

    {"dtype": "uint8" | "uint16" | "int32", "shape": [...], "zlib_base64": str}

the smallest integer type that holds K classes, C-order bytes, zlib level 9, then base64 (the form of
every array here, :func:`encode_array`). Absent in
histories written before they were stored (read back as None).
"""

from __future__ import annotations

import base64
import copy
import json
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import DataError

__all__ = ["History", "sparse_counts", "dense_counts", "split_recall", "counts_classes", "pooled_best_counts",
           "mean_best_recall", "encode_predictions", "decode_predictions", "encode_array", "decode_array"]


@dataclass
class History:
    """What a trial reports (plain JSON through ``to_json``/``from_json``).

    Attributes:
        records: one dict per report (module docstring).
        best_p: (K, K) float32, the pair distribution P in force at the best report so far (None for
            ``erm`` or before the first report).
        best_step: the step of the best report so far (the one ``test_at_best/*`` come from).
        meta: config, n_classes, train_counts (head/tail), the effective learning rate and the device.
        best_val_predictions, best_test_predictions: (n_val,) / (n_test,) int64 predicted class of every
            validation / test image at the best report so far (module docstring; None before the first
            report and in older histories).
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    best_p: np.ndarray | None = None
    best_step: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    best_val_predictions: np.ndarray | None = None
    best_test_predictions: np.ndarray | None = None

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
        return split_recall(self.records[index][split])

    def copy(self) -> History:
        """An independent copy (what a round trip through JSON gives, without encoding: a trial snapshots
        its history at every report, and encoding it all each time grew with the square of the reports)."""
        def array(value):
            return None if value is None else value.copy()

        return History(records=copy.deepcopy(self.records), best_p=array(self.best_p), best_step=self.best_step,
                       meta=copy.deepcopy(self.meta), best_val_predictions=array(self.best_val_predictions),
                       best_test_predictions=array(self.best_test_predictions))

    def to_dict(self) -> dict[str, Any]:
        best_p = None if self.best_p is None else encode_array(np.asarray(self.best_p, dtype=np.float32))
        return {"records": self.records, "best_p": best_p, "best_step": self.best_step, "meta": self.meta,
                **_predictions_to_dict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        best_p = data.get("best_p")
        if best_p is not None:
            best_p = decode_array(best_p).astype(np.float32, copy=False)
        return cls(records=data["records"], best_p=best_p, best_step=data.get("best_step"),
                   meta=data.get("meta", {}), **_predictions_from_dict(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> History:
        return cls.from_dict(json.loads(text))


_PREDICTION_FIELDS = ("best_val_predictions", "best_test_predictions")


def _predictions_to_dict(history: History) -> dict[str, Any]:
    """The encoded prediction fields that are set (none for a history without them, as before)."""
    return {name: encode_predictions(getattr(history, name)) for name in _PREDICTION_FIELDS
            if getattr(history, name) is not None}


def _predictions_from_dict(data: dict[str, Any]) -> dict[str, np.ndarray | None]:
    return {name: None if data.get(name) is None else decode_predictions(data[name]) for name in _PREDICTION_FIELDS}


def encode_predictions(predictions) -> dict[str, Any]:
    """JSON form of an integer array of predicted classes (any shape, e.g. (n,) or (repeats, n)).

    The smallest of uint8 / uint16 / int32 that holds its values, zlib-compressed and base64-encoded
    (module docstring); :func:`decode_predictions` inverts it exactly.
    """
    array = np.asarray(predictions)
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"predictions must be integers (class indices), but got dtype {array.dtype}.")
    if array.size and (array.min() < 0 or array.max() > np.iinfo(np.int32).max):
        raise DataError(f"predictions must lie in [0, 2**31), but got values in [{array.min()}, {array.max()}].")
    top = int(array.max()) if array.size else 0
    dtype = "uint8" if top < 2**8 else "uint16" if top < 2**16 else "int32"
    raw = np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
    return {"dtype": dtype, "shape": list(array.shape),
            "zlib_base64": base64.b64encode(zlib.compress(raw, 9)).decode("ascii")}


def decode_predictions(data: dict[str, Any]) -> np.ndarray:
    """int64 array of predicted classes from :func:`encode_predictions`'s dict."""
    return decode_array(data).astype(np.int64)


def encode_array(array) -> dict[str, Any]:
    """JSON form of a numeric array: non-negative integers as :func:`encode_predictions` (the smallest
    type), floats as float64 or float32 (their own type), C-order little-endian bytes, zlib level 6, base64."""
    array = np.asarray(array)
    if np.issubdtype(array.dtype, np.integer):
        return encode_predictions(array)
    dtype = "float32" if array.dtype == np.float32 else "float64"
    raw = np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
    return {"dtype": dtype, "shape": list(array.shape),
            "zlib_base64": base64.b64encode(zlib.compress(raw, 6)).decode("ascii")}  # 9: as small, 1.5x the time


def decode_array(data: dict[str, Any]) -> np.ndarray:
    """The array of :func:`encode_array`'s dict (in its stored type); also the older uncompressed
    ``{"dtype", "shape", "base64"}`` form of ``best_p``."""
    dtype = np.dtype(data["dtype"]).newbyteorder("<")
    raw = zlib.decompress(base64.b64decode(data["zlib_base64"])) if "zlib_base64" in data else \
        base64.b64decode(data["base64"])
    return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(data["shape"])


def sparse_counts(counts: np.ndarray) -> dict[str, Any]:
    """The compact form of a (K, K) confusion (module docstring): its nonzero entries, delta-coded."""
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise DataError(f"confusion counts must be (K, K), but got shape {counts.shape}.")
    flat = counts.ravel()
    index = np.flatnonzero(flat)  # increasing: row-major positions row * K + col
    values = flat[index]
    if np.all(values == np.round(values)) and (values.size == 0 or values.min() >= 0):
        values = values.astype(np.int64)
    return {"coo": "delta-zlib", "shape": list(counts.shape), "index": encode_array(np.diff(index, prepend=0)),
            "values": encode_array(values)}


def dense_counts(entries, n_classes: int | None = None) -> np.ndarray:
    """(K, K) float confusion counts from :func:`sparse_counts`'s dict or the older ``[row, col, count]``
    list (K = ``n_classes``; the dict carries its own, which ``n_classes`` must then match)."""
    if isinstance(entries, dict):
        shape = tuple(entries["shape"])
        if n_classes is not None and shape != (n_classes, n_classes):
            raise DataError(f"the stored counts are {shape}, but {n_classes} classes were expected.")
        dense = np.zeros(shape[0] * shape[1])
        dense[np.cumsum(decode_array(entries["index"]).astype(np.int64))] = decode_array(entries["values"])
        return dense.reshape(shape)
    if n_classes is None:
        n_classes = counts_classes(entries)
    dense = np.zeros((n_classes, n_classes))
    for row, col, count in entries:
        dense[row, col] = count
    return dense


def counts_classes(entries) -> int:
    """K of stored counts in either form (the list form: the largest class index that occurs, plus one)."""
    if isinstance(entries, dict):
        return int(entries["shape"][0])
    return max(max(row, col) for row, col, _ in entries) + 1


def split_recall(part: dict[str, Any]) -> np.ndarray:
    """(K,) float recall of a stored split (``{"recall": ..., "counts": ...}``), either form."""
    recall = part["recall"]
    return decode_array(recall).astype(float) if isinstance(recall, dict) else np.asarray(recall, dtype=float)


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
