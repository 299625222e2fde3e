"""The history's compact storage: counts, recalls and P round-trip exactly; older histories and
experiments (list counts and recalls, uncompressed P) read the same through the one decoder."""

from __future__ import annotations

import base64
import json
import shutil

import numpy as np
import pytest

from selmix_ray import FinetuneConfig, finetune
from selmix_ray.baselines import baseline_recall, baseline_score
from selmix_ray.constants import BASELINES_FILE, HISTORY_FILE
from selmix_ray.history import (
    History,
    decode_array,
    dense_counts,
    encode_array,
    mean_best_recall,
    pooled_best_counts,
    sparse_counts,
    split_recall,
)
from selmix_ray.metrics import confusion_counts
from selmix_ray.results import load_run


def _old_counts(dense: np.ndarray) -> list[list]:
    """The former list form: [row, col, count] for every nonzero, ints where integral."""
    rows, cols = np.nonzero(dense)
    values = dense[rows, cols]
    cast = int if np.all(values == np.round(values)) else float
    return [[int(r), int(c), cast(v)] for r, c, v in zip(rows, cols, values)]


def _to_old_format(data: dict) -> dict:
    """A history dict as histories were written before the compact form (no predictions either)."""
    old = json.loads(json.dumps(data))
    for record in old["records"]:
        for split in ("val", "test", "val_raw", "test_raw"):
            if split in record:
                part = record[split]
                part["recall"] = split_recall(part).tolist()
                part["counts"] = _old_counts(dense_counts(part["counts"]))
    if old.get("best_p") is not None:
        p = decode_array(old["best_p"]).astype(np.float32)
        old["best_p"] = {"dtype": "float32", "shape": list(p.shape), "base64": base64.b64encode(p.tobytes()).decode()}
    old.pop("best_val_predictions", None)
    old.pop("best_test_predictions", None)
    return old


@pytest.mark.parametrize("kind", ["int", "fraction", "zero", "large"])
def test_counts_round_trip_exactly(kind):
    rng = np.random.default_rng(0)
    K = 1000 if kind == "large" else 7
    labels = rng.integers(0, K, size=20 * K)
    counts = confusion_counts(labels, np.where(rng.random(labels.size) < 0.6, labels, rng.integers(0, K, labels.size)),
                              K).astype(float)
    if kind == "fraction":
        counts = counts / 3
    if kind == "zero":
        counts[:] = 0
    encoded = json.loads(json.dumps(sparse_counts(counts)))
    decoded = dense_counts(encoded, K)
    assert decoded.dtype == np.float64 and np.array_equal(decoded, counts)
    assert np.array_equal(dense_counts(encoded), counts)  # K from the stored shape
    assert np.array_equal(dense_counts(_old_counts(counts), K), counts)  # the former list form
    if kind == "large":  # what the compact form is for: 20k predictions over 1000 classes
        assert len(json.dumps(encoded)) < len(json.dumps(_old_counts(counts))) / 4
    with pytest.raises(Exception, match="expected"):
        dense_counts(encoded, K + 1)


def test_arrays_round_trip_exactly():
    rng = np.random.default_rng(1)
    for array in (rng.random(13), rng.random((4, 5)).astype(np.float32), np.arange(300), np.zeros(0, np.int64)):
        back = decode_array(json.loads(json.dumps(encode_array(array))))
        assert back.shape == array.shape and np.array_equal(back, array)
        assert back.dtype == (array.dtype if array.dtype.kind == "f" else back.dtype)


@pytest.fixture(scope="module")
def histories(digits):
    """Real histories on digits: plain and with a post-hoc correction (four splits per report)."""
    out = []
    for posthoc in ("none", "class_weights"):
        config = FinetuneConfig(steps=40, eval_every=20, refresh_every=10, posthoc=posthoc, device="cpu")
        out.append(finetune(digits, config))
    return out


def test_an_old_format_history_reads_the_same(histories):
    for history in histories:
        old = History.from_json(json.dumps(_to_old_format(history.to_dict())))
        assert old.best_val_predictions is None and old.steps == history.steps
        for index in range(len(history.records)):
            for split in [s for s in ("val", "test", "val_raw", "test_raw") if s in history.records[index]]:
                assert np.array_equal(old.confusion(index, split), history.confusion(index, split))
                assert np.array_equal(old.recall(index, split), history.recall(index, split))
        assert np.array_equal(old.best_p, history.best_p) and old.best_p.dtype == np.float32
        for split in ("val", "test"):
            assert np.array_equal(dense_counts(pooled_best_counts([old])[split]["counts"]),
                                  dense_counts(pooled_best_counts([history])[split]["counts"]))
        assert mean_best_recall([old]) == mean_best_recall([history])


def test_the_compact_history_round_trips(histories):
    for history in histories:
        text = history.to_json()
        again = History.from_json(text)
        assert again.to_json() == text
        record = json.loads(text)["records"][-1]["val"]
        assert isinstance(record["recall"], dict) and record["counts"]["coo"] == "delta-zlib"


def test_baseline_readers_take_both_forms(histories):
    history = histories[0]
    best = history.records[history.best_index()]
    new = {"n_classes": history.n_classes, "val": best["val"], "test": best["test"]}
    old = {"n_classes": history.n_classes, **{s: _to_old_format({"records": [best]})["records"][0][s]
                                              for s in ("val", "test")}}
    for split in ("val", "test"):
        assert np.array_equal(baseline_recall(new, split), baseline_recall(old, split))
    for objective in ("gmean", "mean_recall"):
        assert baseline_score(new, objective, own_objective="min_recall", train_counts=None) == \
            baseline_score(old, objective, own_objective="min_recall", train_counts=None)


@pytest.mark.slow
def test_an_old_format_experiment_reads_the_same(sweep, tmp_path):
    """Every history.json and baselines.json of a real sweep rewritten in the former form: same results."""
    old = tmp_path / "old"
    shutil.copytree(sweep, old)
    rewritten = 0
    for path in old.rglob(HISTORY_FILE):
        data = json.loads(path.read_text())
        data = [_to_old_format(h) for h in data] if isinstance(data, list) else _to_old_format(data)
        path.write_text(json.dumps(data))
        rewritten += 1
    baselines = json.loads((old / BASELINES_FILE).read_text())
    for record in baselines["baselines"].values():
        for split in ("val", "test"):
            record[split]["counts"] = _old_counts(dense_counts(record[split]["counts"]))
    (old / BASELINES_FILE).write_text(json.dumps(baselines))
    assert rewritten >= 8
    new_run, old_run = load_run(sweep), load_run(old)
    for objective in ("gmean", "min_recall"):
        assert new_run.rerank(objective).equals(old_run.rerank(objective))
    assert new_run.per_class(top=3).equals(old_run.per_class(top=3))


def test_copy_is_the_json_round_trip_and_independent(histories):
    for history in histories:
        copied = history.copy()
        assert copied.to_json() == History.from_json(history.to_json()).to_json() == history.to_json()
        copied.records[0]["metrics"]["step"] = -1.0
        copied.best_p[0, 0] = -1.0
        copied.best_val_predictions[0] = -1
        assert history.records[0]["metrics"]["step"] == 0.0 and history.best_p[0, 0] >= 0
        assert history.best_val_predictions[0] >= 0
