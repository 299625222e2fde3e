"""Tests of top-block mode in the fine-tuning loop (docs/method.md, Top-block mode): the last block trains with the head."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from selmix_ray.constants import METRIC_NAMES, SCORE_KEY
from selmix_ray.engine import FinetuneConfig, FinetuneState, Trainer, finetune
from selmix_ray.errors import DataError
from selmix_ray.featureset import FeatureSet, Split
from selmix_ray.gain import class_centroids, gain_matrix
from selmix_ray.metrics import confusion_counts
from selmix_ray.sampling import pair_distribution

SHORT = {"steps": 20, "eval_every": 10, "refresh_every": 5, "batch_size": 16, "device": "cpu"}


def block_features(*, K=4, C=3, H=4, W=4, d=8, pool=0, seed=0) -> FeatureSet:
    """A hand-built top-block FeatureSet: Gaussian (C, H, W) maps per class, a conv+BN+ReLU block (global
    pool) from ``backbones``, x = the block's pooled output, a least-squares head. Every array read-only."""
    from selmix_ray.backbones import block_payload, build_block, cnn_stage

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    payload = block_payload("cnn", cnn_stage(C, d, pool=False), {"in_channels": C, "out_channels": d, "pool": False})
    block = build_block(payload)
    means = rng.normal(0.0, 1.0, (K, C, H, W))

    def split(counts, unlabeled=False):
        y = np.repeat(np.arange(K), counts)
        maps = (means[y] + rng.normal(0.0, 1.0, (len(y), C, H, W))).astype(np.float32)
        with torch.no_grad():
            x = block(torch.from_numpy(maps)).numpy()
        return Split(x, -np.ones_like(y) if unlabeled else y, maps), y

    train, _ = split([40, 20, 8, 4][:K] if K == 4 else [max(40 // (k + 1), 3) for k in range(K)])
    val, _ = split([12] * K)
    test, _ = split([15] * K)
    unlabeled, true_y = split([pool] * K, unlabeled=True) if pool else (None, None)
    design = np.c_[train.x, np.ones(len(train.y))]
    coef = np.linalg.lstsq(design, np.eye(K)[train.y], rcond=None)[0].T  # (K, d + 1)
    for value in payload["state_dict"].values():
        value.flags.writeable = False
    fs = FeatureSet(train=train, val=val, test=test, unlabeled=unlabeled, unlabeled_true_y=true_y, n_classes=K,
                    weight=coef[:, :d].astype(np.float32), bias=coef[:, d].astype(np.float32), block=payload)
    return FeatureSet.from_dict(fs.to_dict(), read_only=True)


def expected_keys(posthoc: bool) -> set[str]:
    keys = {"step", SCORE_KEY, "p_entropy", "p_max", "g_max"}
    prefixes = ["val", "test", "test_at_best"] + (["val/raw", "test/raw"] if posthoc else [])
    return keys | {f"{prefix}/{m}" for prefix in prefixes for m in METRIC_NAMES}


def block_weights(trainer_or_state) -> dict[str, np.ndarray]:
    state = trainer_or_state.block_state if isinstance(trainer_or_state, FinetuneState) else (
        trainer_or_state.block.state_dict())
    return {name: value.detach().cpu().numpy().copy() for name, value in state.items()}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def features():
    return block_features(pool=3)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Real top-block features: the default CNN (2 epochs) cut before its last block, on digits."""
    from selmix_ray.features import build_features

    return build_features("digits", rho=20, backbone="cnn", cut="block", epochs=2,
                          cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


def test_top_lr_is_a_validated_config_field():
    assert FinetuneConfig.from_dict({"top_lr": 3}).top_lr == 3.0
    from selmix_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="top_lr must be >= 0"):
        FinetuneConfig.from_dict({"top_lr": -1.0})
    with pytest.raises(ConfigError, match="top_lr must be a number"):
        FinetuneConfig.from_dict({"top_lr": "fast"})


# -- a trial -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, mixup, posthoc", [
    ("selmix", "feature", "none"),
    ("selmix", "feature_soft", "class_weights"),
    ("selmix", "cutmix", "none"),
    ("selmix", "puzzlemix", "none"),
    ("uniform_mixup", "feature", "none"),
    ("erm", "feature", "logit_adjust"),
])
def test_block_trial_trains_the_block_and_reports_every_key(features, method, mixup, posthoc):
    config = FinetuneConfig.from_dict({**SHORT, "method": method, "mixup": mixup, "posthoc": posthoc})
    trainer = Trainer(features, config)
    initial = block_weights(trainer)
    reports = [trainer.run_until(step) for step in trainer.pending_report_steps()]
    assert [r["step"] for r in reports] == [0.0, 10.0, 20.0]
    for r in reports:
        assert set(r) == expected_keys(posthoc != "none")
        assert all(isinstance(v, float) for v in r.values())
    moved = {name: float(np.abs(value - initial[name]).max()) for name, value in block_weights(trainer).items()}
    assert moved["block.0.weight"] > 0 and moved["block.1.weight"] > 0, moved  # conv and BatchNorm scale
    assert moved["block.1.running_mean"] == 0, "BatchNorm statistics stay frozen (eval mode)"
    assert trainer.history.meta["cut"] == "block" and trainer.history.meta["top_lr_effective"] > 0


def test_top_lr_zero_freezes_the_block_and_matches_the_cached_features_at_step_0(features):
    config = FinetuneConfig.from_dict({**SHORT, "top_lr": 0.0})
    trainer = Trainer(features, config)
    first = trainer.run_until(0)
    head_only = Trainer(FeatureSet.from_dict({**features.to_dict(), "block": None}), config).run_until(0)
    for key in first:  # the block's outputs at step 0 are the cached x (up to float rounding)
        assert first[key] == pytest.approx(head_only[key], abs=1e-6, nan_ok=True), key
    initial = block_weights(trainer)
    trainer.run_until(10)
    for name, value in block_weights(trainer).items():
        np.testing.assert_array_equal(value, initial[name])


def test_head_only_mode_ignores_top_lr(synthetic_features):
    plain = synthetic_features()
    reports = [finetune(plain, FinetuneConfig.from_dict({**SHORT, "top_lr": lr})).metrics for lr in (1.0, 7.0)]
    assert reports[0] == reports[1]


# -- exactness ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mixup, momentum", [("feature", 0.9), ("cutmix", 0.0)])
def test_resumed_block_trial_equals_the_uninterrupted_one(features, tmp_path, mixup, momentum):
    config = FinetuneConfig.from_dict({**SHORT, "steps": 30, "mixup": mixup, "momentum": momentum})
    uninterrupted, states = [], []
    finetune(features, config, report=uninterrupted.append, checkpoint=states.append)
    states[1].save(tmp_path / "state.pt")  # stopped after the step-10 report
    state = FinetuneState.load(tmp_path / "state.pt")
    assert state.block_state is not None and any(k.startswith("block.") for k in state.velocity)
    resumed = []
    trainer = Trainer(features, config, state=state)
    for step in trainer.pending_report_steps():
        resumed.append(trainer.run_until(step))
    assert resumed == uninterrupted[2:]
    final = block_weights(states[-1])
    for name, value in block_weights(trainer).items():
        np.testing.assert_array_equal(value, final[name])


def test_resume_refuses_a_state_from_the_other_mode(features):
    config = FinetuneConfig.from_dict(SHORT)
    trainer = Trainer(features, config)
    trainer.run_until(0)
    head_only = FeatureSet.from_dict({**features.to_dict(), "block": None})
    with pytest.raises(DataError, match="top block"):
        Trainer(head_only, config, state=trainer.state())


def test_gain_at_a_refresh_matches_a_fresh_computation_from_the_current_block(features):
    from selmix_ray.backbones import build_block

    config = FinetuneConfig.from_dict({**SHORT, "top_lr": 3.0})
    trainer = Trainer(features, config)
    trainer.run_until(0)
    trainer.run_until(10)  # refreshes at 5 and 10 (the refresh at 10 comes before the report)
    # Independent recomputation: a fresh block with the trainer's weights, the validation confusion of
    # its features under the current head, the objective built by name (min_recall with beta=0 has no
    # memory), then P.
    block = build_block(features.block)
    block.load_state_dict(trainer.block.state_dict())
    with torch.no_grad():
        val_z = block(torch.from_numpy(np.array(features.val.maps))).double().numpy()
    weight, bias = trainer.weight.double().numpy(), trainer.bias.double().numpy()
    counts = confusion_counts(features.val.y, (val_z @ weight.T + bias).argmax(axis=1), features.n_classes)
    centroids = class_centroids(val_z, features.val.y, features.n_classes)
    np.testing.assert_allclose(trainer.centroids, centroids, rtol=1e-5, atol=1e-6)
    assert not np.allclose(centroids, class_centroids(features.val.x, features.val.y, features.n_classes),
                           atol=1e-4), "the block moved, so must the centroids"
    G = gain_matrix(counts, centroids, weight, bias, "min_recall", lambda_min=config.lambda_min)
    P = pair_distribution(G, s=config.s, positive_only=True, floor=1 / (features.n_classes + 1), normalize=True)
    assert trainer.diagnostics["g_max"] == pytest.approx(G.max(), rel=1e-4)
    np.testing.assert_allclose(trainer.P, P, rtol=1e-4, atol=1e-7)


def test_shared_arrays_and_block_payload_are_never_written(features):
    before = {name: np.array(getattr(features, name).maps) for name in ("train", "val", "test", "unlabeled")}
    payload = {name: np.array(value) for name, value in features.block["state_dict"].items()}
    for mixup in ("feature", "cutmix"):  # read-only arrays: any write would raise
        finetune(features, FinetuneConfig.from_dict({**SHORT, "mixup": mixup, "momentum": 0.5}))
    for name, maps in before.items():
        np.testing.assert_array_equal(getattr(features, name).maps, maps)
        assert not getattr(features, name).maps.flags.writeable
    for name, value in features.block["state_dict"].items():
        np.testing.assert_array_equal(value, payload[name])


def test_mismatched_block_and_head_raise_a_clear_error(features):
    data = features.to_dict()
    data["block"] = block_features(d=5).block  # outputs 5 features, the head expects 8
    with pytest.raises(DataError, match="head expects"):
        Trainer(FeatureSet.from_dict(data), FinetuneConfig.from_dict(SHORT))


# -- the real thing: digits, the default CNN cut before its last block -------------------------------------


def test_digits_block_trial_trains_reports_and_resumes_exactly(digits, tmp_path):
    assert digits.block is not None and digits.train.maps.ndim == 4
    config = FinetuneConfig.from_dict({**SHORT, "steps": 40, "batch_size": 32, "posthoc": "class_weights"})
    uninterrupted, states = [], []
    history = finetune(digits, config, report=uninterrupted.append, checkpoint=states.append)
    assert all(set(r) == expected_keys(True) for r in uninterrupted)
    assert all(math.isfinite(r[SCORE_KEY]) for r in uninterrupted)
    initial = {f"block.{name}": np.asarray(value) for name, value in digits.block["state_dict"].items()}
    final = block_weights(states[-1])
    assert not np.array_equal(final["block.0.weight"], initial["block.0.weight"])  # the conv trained
    assert history.meta["cut"] == "block"

    states[2].save(tmp_path / "state.pt")  # stopped after the step-20 report
    resumed = []
    finetune(digits, config, report=resumed.append, checkpoint=states.append,
             state=FinetuneState.load(tmp_path / "state.pt"))
    assert resumed == uninterrupted[3:]
    for name, value in block_weights(states[-1]).items():
        np.testing.assert_array_equal(value, final[name])


def test_block_features_are_zero_copy_in_a_trial(features, ray_cluster):
    """Through Ray's object store, as a Tune trial receives them: the maps are read-only shared memory and
    the trial's tensors wrap them without a copy (the block's small weights are copied into the module)."""
    import ray

    shared = FeatureSet.from_object_store(ray.get(ray.put(features.to_dict())))
    trainer = Trainer(shared, FinetuneConfig.from_dict(SHORT))
    for name in ("train", "val", "test", "unlabeled"):
        maps = getattr(shared, name).maps
        assert not maps.flags.writeable
        tensor = getattr(trainer.model, f"{'pool' if name == 'unlabeled' else name}_maps")
        assert tensor.data_ptr() == maps.__array_interface__["data"][0], name
    trainer.run_until(0)
    trainer.run_until(10)


def test_a_state_written_before_top_lr_existed_still_resumes(synthetic_features):
    plain = synthetic_features()
    config = FinetuneConfig.from_dict(SHORT)
    uninterrupted, states = [], []
    finetune(plain, config, report=uninterrupted.append, checkpoint=states.append)
    old = states[1]
    del old.config["top_lr"]  # as a checkpoint of an earlier version holds it
    resumed = []
    finetune(plain, config, report=resumed.append, state=old)
    assert resumed == uninterrupted[2:]
    with pytest.raises(Exception, match="top_lr"):
        finetune(plain, dataclasses.replace(config, top_lr=2.0), state=old)


@pytest.mark.slow
def test_a_sweep_on_block_features_trains_blocks_in_trials_and_baselines(ray_cluster, digits, tmp_path,
                                                                        monkeypatch):
    """search() needs nothing extra: trials and baselines run in top-block mode because the features do."""
    import json

    from selmix_ray.constants import BASELINES_FILE
    from selmix_ray.sweep import search

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the baselines' cache
    space = {"objective": "min_recall", "space": {"top_lr": {"loguniform": [0.5, 5.0]}},
             "fixed": {"steps": 20, "eval_every": 10, "batch_size": 32}}
    run = search(space, features=digits, storage=tmp_path, name="block", num_samples=2, max_concurrent=2,
                 scheduler="fifo", seed=3)
    assert len(run.df) == 2 and set(run.df["status"]) == {"complete"}
    top_lrs = set()
    for trial_id in run.df["trial_id"]:
        meta = run.history(trial_id).copies[0].meta
        assert meta["cut"] == "block"
        top_lrs.add(meta["config"]["top_lr"])
    assert len(top_lrs) == 2
    erm = json.loads((tmp_path / "block" / BASELINES_FILE).read_text())["baselines"]["erm"]
    config = FinetuneConfig.from_dict({**erm["config"]})
    assert finetune(digits, config).metrics[-1] == pytest.approx(erm["metrics"], nan_ok=True)  # block mode
    head_only = finetune(FeatureSet.from_dict({**digits.to_dict(), "block": None}), config).metrics[-1]
    assert head_only != erm["metrics"]
