"""Tests of the fine-tuning loop (docs/method.md, One trial) on small synthetic FeatureSets and on digits."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from selmix_ray.constants import METRIC_NAMES, SCORE_KEY
from selmix_ray.engine import (
    FinetuneConfig,
    FinetuneState,
    History,
    Trainer,
    finetune,
    finetune_repeats,
)
from selmix_ray.errors import ConfigError, TrainingError
from selmix_ray.featureset import FeatureSet

SHORT = {"steps": 20, "eval_every": 10, "refresh_every": 5, "batch_size": 16, "device": "cpu"}


def expected_keys(posthoc: bool) -> set[str]:
    keys = {"step", SCORE_KEY, "p_entropy", "p_max", "g_max"}
    prefixes = ["val", "test", "test_at_best"] + (["val/raw", "test/raw"] if posthoc else [])
    return keys | {f"{prefix}/{m}" for prefix in prefixes for m in METRIC_NAMES}


def run(features, **overrides):
    reports = []
    history = finetune(features, FinetuneConfig.from_dict({**SHORT, **overrides}), report=reports.append)
    return reports, history


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def features(synthetic_features):
    return synthetic_features(pool=5)


# -- config ------------------------------------------------------------------------------------------


def test_config_defaults_follow_the_spec_and_round_trip():
    config = FinetuneConfig()
    assert (config.method, config.objective, config.s, config.gain_scale, config.lr, config.steps) == (
        "selmix", "min_recall", 5.0, "max", 1.0, 2000)
    assert (config.refresh_every, config.eval_every, config.batch_size, config.floor) == (10, 50, 64, None)
    assert FinetuneConfig.from_dict(config.to_dict()) == config
    assert FinetuneConfig.from_dict({"lr": 2, "steps": 100.0, "eval_every": 50}).steps == 100


def test_config_error_lists_every_problem():
    with pytest.raises(ConfigError) as caught:
        FinetuneConfig.from_dict({
            "method": "adam", "stepz": 3, "lr": -1.0, "steps": 120, "eval_every": 50, "batch_size": "many",
            "objective": "min_recall", "objective_params": {"alpha": 0.5}, "device": "tpu",
        })
    problems = caught.value.problems
    text = "\n".join(problems)
    assert len(problems) == 6, text
    for fragment in ("'stepz'", "known fields are", "method must be one of", "lr must be > 0",
                     "batch_size must be an integer", "multiple of eval_every", "device must be"):
        assert fragment in text
    with pytest.raises(ConfigError, match="does not accept alpha"):
        FinetuneConfig.from_dict({"objective_params": {"alpha": 0.5}})
    with pytest.raises(ConfigError, match="Unknown objective"):
        FinetuneConfig(objective="max_accuracy")


# -- every method and variant --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, mixup, posthoc",
    [
        ("selmix", "feature", "none"),
        ("selmix", "feature_soft", "logit_adjust"),
        ("uniform_mixup", "feature", "class_weights"),
        ("erm", "feature", "none"),
    ],
)
def test_each_method_reports_every_key(features, method, mixup, posthoc):
    reports, history = run(features, method=method, mixup=mixup, posthoc=posthoc)
    assert [r["step"] for r in reports] == [0.0, 10.0, 20.0]
    for r in reports:
        assert set(r) == expected_keys(posthoc != "none")
        finite = {k: v for k, v in r.items() if k not in ("p_entropy", "p_max", "g_max")}
        assert all(math.isfinite(v) for v in finite.values()), r
        assert r[SCORE_KEY] == max(x["val/objective"] for x in reports[: reports.index(r) + 1])
    diagnostics = [reports[-1][k] for k in ("p_entropy", "p_max", "g_max")]
    if method == "erm":
        assert all(math.isnan(v) for v in diagnostics) and history.best_p is None
    elif method == "uniform_mixup":
        assert math.isnan(diagnostics[2]) and history.best_p.shape == (4, 4)
    else:
        assert all(math.isfinite(v) for v in diagnostics)
    assert len(history.records) == 3 and history.records[0]["val"]["counts"]
    assert history.confusion(-1, "val").sum() == len(features.val)


@pytest.mark.parametrize("mixup", ["cutmix", "puzzlemix"])
def test_map_variants_run_on_cached_maps(mixup, synthetic_features):
    features = synthetic_features(maps=True)
    reports, _ = run(features, mixup=mixup, steps=10, eval_every=10)
    assert set(reports[-1]) == expected_keys(False)
    with pytest.raises(ConfigError, match="needs spatial maps"):
        run(synthetic_features(), mixup=mixup)


def test_config_accepts_numpy_integers_and_refuses_bools():
    config = FinetuneConfig.from_dict({**SHORT, "steps": np.int64(40), "eval_every": np.int32(10),
                                       "lr": np.float32(0.5)})
    assert (config.steps, type(config.steps), type(config.lr)) == (40, int, float)
    direct = FinetuneConfig(batch_size=np.int64(32), s=np.float64(2.0))
    assert type(direct.batch_size) is int and json.loads(json.dumps(direct.to_dict()))["batch_size"] == 32
    with pytest.raises(ConfigError) as error:
        FinetuneConfig.from_dict({"batch_size": True, "lr": False})
    assert error.value.problems == ["lr must be a number, but got False.",
                                    "batch_size must be an integer, but got True."]


def test_step_api_composes_to_run_until(features):
    """refresh / train_steps / logits: what run_until does between two reports, step by step."""
    config = FinetuneConfig.from_dict({**SHORT, "momentum": 0.9})
    whole, parts = Trainer(features, config), Trainer(features, config)
    whole.run_until(0)
    whole.run_until(10)  # refreshes at 5 and 10
    parts.run_until(0)
    for _ in range(2):
        parts.train_steps(5)
        parts.refresh()
    assert parts.step == whole.step == 10
    assert torch.equal(parts.weight, whole.weight) and torch.equal(parts.bias, whole.bias)
    np.testing.assert_array_equal(parts.P, whole.P)
    by_hand = features.val.x.astype(np.float64) @ parts.weight.double().numpy().T + parts.bias.double().numpy()
    np.testing.assert_allclose(parts.logits("val"), by_hand, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(parts.logits("test"), features.test.x @ parts.weight.numpy().T + parts.bias.numpy(),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="n must be an integer in"):
        parts.train_steps(config.steps)  # past the last step


def test_uniform_mixup_samples_pairs_uniformly(features):
    config = FinetuneConfig.from_dict({**SHORT, "method": "uniform_mixup", "steps": 100, "eval_every": 100,
                                       "batch_size": 100})
    trainer = Trainer(features, config)
    drawn = []
    sample = trainer.sampler.sample
    trainer.sampler.sample = lambda B: drawn.append(sample(B)) or drawn[-1]
    trainer.run_until(0)
    report = trainer.run_until(100)
    K = features.n_classes
    np.testing.assert_array_equal(trainer.P, np.full((K, K), 1.0 / K**2))
    assert report["p_entropy"] == pytest.approx(math.log(K * K)) and report["p_max"] == pytest.approx(1 / K**2)
    pairs = np.concatenate([batch.pairs for batch in drawn])
    counts = np.bincount(pairs[:, 0] * K + pairs[:, 1], minlength=K * K)
    expected = len(pairs) / K**2  # 625 per pair; binomial sd ~ 24
    assert np.abs(counts - expected).max() < 5 * math.sqrt(expected)


# -- exactness: seeds, resume, label leak, repeats -----------------------------------------------------


def test_same_seed_gives_identical_reports_and_another_seed_does_not(features):
    first, _ = run(features, momentum=0.5)
    again, _ = run(features, momentum=0.5)
    other, _ = run(features, momentum=0.5, seed=1)
    assert first == again
    assert first != other


@pytest.mark.parametrize("posthoc", ["none", "logit_adjust"])
def test_resumed_run_reports_exactly_what_an_uninterrupted_run_reports(features, tmp_path, posthoc):
    overrides = {"steps": 40, "refresh_every": 7, "momentum": 0.9, "posthoc": posthoc}
    uninterrupted, full_history = run(features, **overrides)
    config = FinetuneConfig.from_dict({**SHORT, **overrides})

    saved = []

    def stop_after_step_20(state):
        if state.step == 20:
            state.save(tmp_path / "state.pt")
            saved.append(state.step)
            raise KeyboardInterrupt  # the trial is killed right after its checkpoint

    with pytest.raises(KeyboardInterrupt):
        finetune(features, config, checkpoint=stop_after_step_20)
    assert saved == [20]
    resumed_reports = []
    history = finetune(features, config, report=resumed_reports.append,
                       state=FinetuneState.load(tmp_path / "state.pt"))
    assert resumed_reports == uninterrupted[3:]
    assert history.to_json() == full_history.to_json()


def test_a_state_in_the_former_layout_resumes_the_same(features, tmp_path):
    """States written before P was compressed hold it as a float64 tensor: they load to the same P."""
    config = FinetuneConfig.from_dict({**SHORT, "steps": 40, "refresh_every": 7})
    states = []
    history = finetune(features, config, checkpoint=states.append)
    states[2].save(tmp_path / "new.pt")
    data = torch.load(tmp_path / "new.pt", weights_only=True)
    assert isinstance(data["pair_distribution"], dict)  # compressed
    data["pair_distribution"] = torch.from_numpy(np.array(states[2].pair_distribution))
    torch.save(data, tmp_path / "old.pt")
    for name in ("new.pt", "old.pt"):
        state = FinetuneState.load(tmp_path / name)
        assert np.array_equal(state.pair_distribution, states[2].pair_distribution)
        assert state.pair_distribution.dtype == np.float64
        resumed = finetune(features, config, state=dataclasses.replace(state, history=states[2].history))
        assert resumed.to_json() == history.to_json()


def test_resume_refuses_another_config(features, tmp_path):
    states = []
    run_config = FinetuneConfig.from_dict(SHORT)
    finetune(features, run_config, checkpoint=states.append)
    with pytest.raises(ConfigError, match="different config"):
        finetune(features, dataclasses.replace(run_config, s=1.0), state=states[1])


def test_unlabeled_true_labels_never_reach_the_loop(features):
    assert features.unlabeled is not None
    scrambled = np.random.default_rng(5).permutation(features.unlabeled_true_y)
    scrambled = (scrambled + 1) % features.n_classes
    leaked = dataclasses.replace(features, unlabeled_true_y=scrambled)
    first, history = run(features, refresh_every=3)
    assert first == run(leaked, refresh_every=3)[0]
    assert history.records[-1]["step"] == 20


def test_repeats_report_the_mean_of_copies_with_consecutive_seeds(features):
    config = FinetuneConfig.from_dict({**SHORT, "seed": 3})
    means, states = [], []
    histories = finetune_repeats(features, config, repeats=2, report=means.append, checkpoint=states.append)
    copies = [run(features, seed=seed)[0] for seed in (3, 4)]
    for index, mean in enumerate(means):
        for key, value in mean.items():
            np.testing.assert_allclose(value, np.mean([copy[index][key] for copy in copies]), rtol=1e-12)
    assert [h.metrics for h in histories] == copies
    assert len(states[-1]) == 2 and states[-1][1].config["seed"] == 4


# -- history, state, degenerate cases -------------------------------------------------------------------


def test_history_json_round_trip_keeps_counts_and_best_p(features):
    _, history = run(features, posthoc="logit_adjust")
    restored = History.from_json(history.to_json())
    assert restored.records == history.records and restored.best_step == history.best_step
    assert restored.best_p.dtype == np.float32
    np.testing.assert_array_equal(restored.best_p, history.best_p)
    best = [r for r in history.records if r["step"] == history.best_step][0]
    assert best["metrics"]["val/objective"] == history.metrics[-1][SCORE_KEY]
    np.testing.assert_allclose(restored.confusion(0, "test_raw").sum(axis=1), 15)
    assert restored.records[0]["posthoc"]["kind"] == "logit_adjust"


def test_degenerate_cases_stay_finite(features):
    # P collapses onto one pair; every pseudo-label is rejected (threshold 1), so partners fall back.
    reports, history = run(features, s=1e4, floor=0.0, gain_scale="none", pseudo_label_threshold=1.0)
    assert all(math.isfinite(v) for r in reports for v in r.values())
    assert reports[0]["p_max"] > 0.99
    # a class that the starting head never predicts (zero recall and coverage)
    dead = dataclasses.replace(features, bias=np.where(np.arange(4) == 3, -1e3, features.bias).astype(np.float32))
    reports, _ = run(dead, objective="gmean")
    assert reports[0]["val/min_recall"] == 0.0 and all(math.isfinite(r["g_max"]) for r in reports)


def test_nan_loss_stops_with_training_error(features):
    with pytest.raises(TrainingError, match="diverged"):
        run(features, lr=1e30, lr_scale="none")


def test_shared_arrays_are_neither_written_nor_warned_about(features):
    before = {name: getattr(features, name).x.copy() for name in ("train", "val", "test", "unlabeled")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(features)
    for name, x in before.items():
        np.testing.assert_array_equal(getattr(features, name).x, x)
        assert not getattr(features, name).x.flags.writeable


def test_float16_features_train_in_float32(synthetic_features):
    features = synthetic_features()
    half = features.to_dict()
    for name in ("train", "val", "test"):
        half[name] = {**half[name], "x": half[name]["x"].astype(np.float16)}
    reports, _ = run(FeatureSet.from_dict(half))
    assert all(math.isfinite(r["val/objective"]) for r in reports)


def test_import_needs_no_ray_optuna_or_pyarrow():
    code = ("import sys, selmix_ray.engine; "
            "print(sorted(m for m in ('ray', 'optuna', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- does it work ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from selmix_ray.features import build_features

    return build_features("digits", rho=20, backbone="identity", cache_dir=tmp_path_factory.mktemp("cache"),
                          progress=False)


def test_selmix_raises_validation_min_recall_on_long_tailed_digits(digits):
    reports, history = run(digits, steps=300, eval_every=50, refresh_every=10, batch_size=64)
    start = reports[0]["val/min_recall"]
    assert reports[-1][SCORE_KEY] > start + 0.05, [r["val/min_recall"] for r in reports]
    assert history.best_step > 0


def test_cross_fitted_posthoc_scores_are_not_above_in_sample_scores_on_average(synthetic_features):
    from selmix_ray.metrics import confusion_counts
    from selmix_ray.posthoc import fit_correction

    cross_fitted, in_sample = [], []
    for seed in range(4):
        features = synthetic_features(seed=seed, rho=20.0)
        trainer = Trainer(features, FinetuneConfig(steps=0, eval_every=1, posthoc="class_weights", device="cpu"))
        cross_fitted.append(trainer.run_until(0)["val/objective"])
        logits, labels = trainer.logits("val"), features.val.y
        correction = fit_correction("class_weights", logits, labels, trainer.scorer,
                                    train_counts=features.train_counts)
        counts = confusion_counts(labels, correction.apply(logits).argmax(axis=1), features.n_classes)
        in_sample.append(trainer.scorer.value(counts / counts.sum()))
    assert np.mean(cross_fitted) <= np.mean(in_sample), (cross_fitted, in_sample)


def test_mean_squared_norm_matches_numpy_on_features_and_maps():
    """The lr_scale='feature_norm' denominator, chunked in float32, against a float64 numpy reference."""
    from selmix_ray.models import NORM_CHUNK, _mean_squared_norm

    rng = np.random.default_rng(0)
    for shape in [(2 * NORM_CHUNK + 7, 16), (NORM_CHUNK + 3, 3, 4, 4), (5, 8)]:
        x = (rng.normal(size=shape) * 7).astype(np.float16)
        expected = float((x.astype(np.float64).reshape(shape[0], -1) ** 2).sum(axis=1).mean())
        assert _mean_squared_norm(torch.from_numpy(x)) == pytest.approx(expected, rel=1e-5)
