"""The trainable without a cluster: Ray Tune's report/get_checkpoint are replaced by recorders, so we can
check one report per engine report, each carrying a checkpoint, and resume-from-checkpoint = uninterrupted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from selmix_ray.constants import HISTORY_FILE, SCORE_KEY, STATE_FILE, STEP_KEY
from selmix_ray.engine import FinetuneConfig, finetune
from selmix_ray.featureset import FeatureSet, Split
from selmix_ray.trainable import FAULT_ENV, TrialFault, run_trial, trial_settings

SPACE = {"objective": "min_recall", "space": {"lr": {"loguniform": [0.1, 10.0]}},
         "fixed": {"steps": 30, "eval_every": 10, "refresh_every": 5}}


def _features(seed: int = 0) -> FeatureSet:
    rng = np.random.default_rng(seed)
    K, d = 4, 8
    centers = rng.normal(size=(K, d)) * 2

    def split(counts):
        y = np.repeat(np.arange(K), counts)
        return Split(x=(centers[y] + rng.normal(size=(len(y), d))).astype(np.float32), y=y.astype(np.int64))

    return FeatureSet(train=split([40, 20, 8, 3]), val=split([10] * K), test=split([10] * K), n_classes=K,
                      weight=np.zeros((K, d), np.float32), bias=np.zeros(K, np.float32), key="synthetic")


class _FakeTune:
    """Records tune.report calls and copies each checkpoint folder, as Ray would persist it."""

    def __init__(self, root: Path, restore_from: Path | None = None):
        self.root, self.restore_from, self.reports = root, restore_from, []

    def report(self, metrics, *, checkpoint=None):
        saved = None
        if checkpoint is not None:
            saved = self.root / f"checkpoint_{len(self.reports):06d}"
            shutil.copytree(checkpoint.path, saved)
        self.reports.append((dict(metrics), saved))

    def get_checkpoint(self):
        from ray.tune import Checkpoint

        return None if self.restore_from is None else Checkpoint.from_directory(str(self.restore_from))


@pytest.fixture
def fake_tune(monkeypatch, tmp_path):
    import ray.tune

    def install(restore_from=None, name="run"):
        fake = _FakeTune(tmp_path / name, restore_from)
        (tmp_path / name).mkdir()
        monkeypatch.setattr(ray.tune, "report", fake.report)
        monkeypatch.setattr(ray.tune, "get_checkpoint", fake.get_checkpoint)
        return fake

    return install


def test_one_report_per_engine_report_each_with_state_and_history(fake_tune, monkeypatch):
    monkeypatch.delenv(FAULT_ENV, raising=False)
    features = _features()
    fake = fake_tune()
    run_trial({"lr": 1.0}, features=features.to_dict(), settings=trial_settings(SPACE, repeats=1, seed=0))

    config = FinetuneConfig.from_dict({"objective": "min_recall", "steps": 30, "eval_every": 10,
                                       "refresh_every": 5, "lr": 1.0, "seed": 0, "device": "cpu"})
    reference = []
    finetune(features, config, report=reference.append)
    assert [m[STEP_KEY] for m, _ in fake.reports] == [0, 10, 20, 30]
    assert all(folder is not None for _, folder in fake.reports)
    for (metrics, folder), expected in zip(fake.reports, reference):
        assert metrics == pytest.approx(expected, nan_ok=True)
        history = json.loads((folder / HISTORY_FILE).read_text())
        assert [r["step"] for r in history["records"]] == list(range(0, int(metrics[STEP_KEY]) + 1, 10))
        assert (folder / STATE_FILE).is_file()


def test_resuming_from_a_checkpoint_equals_the_uninterrupted_trial(fake_tune, monkeypatch):
    monkeypatch.delenv(FAULT_ENV, raising=False)
    features = _features(1)
    settings = trial_settings(SPACE, repeats=1, seed=0)
    whole = fake_tune(name="whole")
    run_trial({"lr": 2.0}, features=features.to_dict(), settings=settings)
    middle = whole.reports[1][1]  # checkpoint of step 10

    resumed = fake_tune(restore_from=middle, name="resumed")
    run_trial({"lr": 2.0}, features=features.to_dict(), settings=settings)
    assert [m[STEP_KEY] for m, _ in resumed.reports] == [20, 30]
    for (a, _), (b, _) in zip(whole.reports[2:], resumed.reports):
        assert a == pytest.approx(b, nan_ok=True, abs=0)


def test_repeats_checkpoint_every_copy_and_report_the_mean(fake_tune, monkeypatch):
    monkeypatch.delenv(FAULT_ENV, raising=False)
    features = _features(2)
    fake = fake_tune()
    run_trial({"lr": 1.0}, features=features.to_dict(), settings=trial_settings(SPACE, repeats=2, seed=5))
    folder = fake.reports[-1][1]
    assert sorted(p.name for p in folder.iterdir()) == sorted([HISTORY_FILE, "finetune_state_0.pt", "finetune_state_1.pt"])
    histories = json.loads((folder / HISTORY_FILE).read_text())
    assert len(histories) == 2
    scores = [h["records"][-1]["metrics"][SCORE_KEY] for h in histories]
    assert fake.reports[-1][0][SCORE_KEY] == pytest.approx(np.mean(scores))


def test_fault_hook_raises_once_after_the_checkpoint(fake_tune, monkeypatch, tmp_path):
    import ray.tune

    monkeypatch.setenv(FAULT_ENV, "10")
    context = type("Context", (), {"get_trial_id": lambda self: "trial0"})()
    monkeypatch.setattr(ray.tune, "get_context", lambda: context)
    settings = trial_settings(SPACE, repeats=1, seed=0, fault_dir=str(tmp_path))
    fake = fake_tune()
    with pytest.raises(TrialFault):
        run_trial({"lr": 1.0}, features=_features().to_dict(), settings=settings)
    assert [m[STEP_KEY] for m, _ in fake.reports] == [0, 10]  # step 10 was checkpointed before the fault
    run_trial({"lr": 1.0}, features=_features().to_dict(), settings=settings)  # the retry does not raise
    assert fake.reports[-1][0][STEP_KEY] == 30


def test_checkpoints_at_step_0_every_kth_report_the_rungs_and_the_end(fake_tune, monkeypatch):
    import torch

    monkeypatch.delenv(FAULT_ENV, raising=False)
    features = _features(3)
    space = {**SPACE, "fixed": {**SPACE["fixed"], "steps": 50}}
    settings = trial_settings(space, repeats=1, seed=0, checkpoint_every=2, checkpoint_steps=[30])
    fake = fake_tune()
    run_trial({"lr": 1.0}, features=features.to_dict(), settings=settings)

    config = FinetuneConfig.from_dict({"objective": "min_recall", "steps": 50, "eval_every": 10,
                                       "refresh_every": 5, "lr": 1.0, "seed": 0, "device": "cpu"})
    reference = []
    finetune(features, config, report=reference.append)
    assert len(fake.reports) == len(reference)  # every report reaches Tune, checkpointed or not
    for (metrics, _), expected in zip(fake.reports, reference):
        assert metrics == pytest.approx(expected, nan_ok=True, abs=0)
    checkpointed = [int(m[STEP_KEY]) for m, folder in fake.reports if folder is not None]
    assert checkpointed == [0, 20, 30, 40, 50]  # 10 is neither a 2nd report, a rung nor the end
    for metrics, folder in fake.reports:
        if folder is None:
            continue
        history = json.loads((folder / HISTORY_FILE).read_text())
        assert [r["step"] for r in history["records"]] == list(range(0, int(metrics[STEP_KEY]) + 1, 10))
        stored = torch.load(folder / STATE_FILE, weights_only=True)
        assert json.loads(stored["history"])["records"] == []  # the history is written once, in history.json


def test_a_retry_from_a_sparse_checkpoint_replays_the_same_reports(fake_tune, monkeypatch):
    monkeypatch.delenv(FAULT_ENV, raising=False)
    features = _features(4)
    space = {**SPACE, "fixed": {**SPACE["fixed"], "steps": 50}}
    settings = trial_settings(space, repeats=2, seed=1, checkpoint_every=3)
    whole = fake_tune(name="whole")
    run_trial({"lr": 2.0}, features=features.to_dict(), settings=settings)
    assert [int(m[STEP_KEY]) for m, folder in whole.reports if folder is not None] == [0, 30, 50]

    resumed = fake_tune(restore_from=whole.reports[3][1], name="resumed")  # the step-30 checkpoint
    run_trial({"lr": 2.0}, features=features.to_dict(), settings=settings)
    assert [m[STEP_KEY] for m, _ in resumed.reports] == [40, 50]
    for (a, _), (b, _) in zip(whole.reports[4:], resumed.reports):
        assert a == pytest.approx(b, nan_ok=True, abs=0)
    whole_histories = json.loads((whole.reports[-1][1] / HISTORY_FILE).read_text())
    resumed_histories = json.loads((resumed.reports[-1][1] / HISTORY_FILE).read_text())
    assert resumed_histories == whole_histories  # the history restored from history.json went on unchanged


def test_checkpoint_every_must_be_a_positive_integer():
    from selmix_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="checkpoint_every must be an integer >= 1"):
        trial_settings(SPACE, repeats=1, seed=0, checkpoint_every=0)
