"""The SelMix fine-tuning loop: one trial, no Ray (docs/method.md, One trial).

``finetune(features, config)`` trains the linear head on cached (frozen-backbone) features:

    every refresh_every steps: validation confusion -> objective.update -> gain G -> pair distribution P
                               -> pseudo-labels of the unlabeled pool
    every step:                draw pairs from P, mix, one SGD step on the head (cosine schedule);
                               the batches up to the next refresh or report are drawn and mixed at once
    step 0, every eval_every:  evaluate validation and test, report, checkpoint

At a step where both happen, the refresh comes first (sharing the validation pass), so a report's
``p_entropy``/``p_max``/``g_max`` describe the P in force from that step on. ``report(metrics)`` is called
with the scalars, then ``checkpoint(state)`` with a :class:`FinetuneState` that resumes exactly.

Memory: the FeatureSet's arrays are wrapped with ``torch.from_numpy`` and never written or copied on the
host; each SGD batch is gathered and converted to float32 (float16 caches stay float16). On CUDA the
arrays are moved to the device once, in their stored dtype. Evaluation runs in chunks.

Top-block mode (docs/method.md, Top-block mode) is on when the FeatureSet carries a block payload (``features.block``,
from ``build_features(..., cut="block")``): the cut point comes from the features, not from the config.
Each split's ``maps`` (n, C, H, W) are then the input of the backbone's last block, and the trial trains a
fresh copy of that block (``block.build_block``) together with the head. The two modes are two model
objects with one interface (:mod:`selmix_ray.models`: ``HeadModel``, ``TopBlockModel``), so this loop has
no branch on the mode:

- ``feature``/``feature_soft`` mix the block's outputs (penultimate features) of the two samples' maps;
  ``cutmix``/``puzzlemix`` mix the cached maps, which then go through the block; ``erm`` feeds single maps.
  The indices, mixing weights and (for map variants) mixed maps of a refresh interval are still drawn at
  once; the block runs step by step, since it changes at every step.
- One SGD optimiser (explicit updates, same cosine schedule, momentum and weight decay) for both parts:
  the head at ``lr`` (relative to the mean squared norm of the initial features ``x``), the block at
  ``top_lr`` (relative to the mean squared norm of the training maps, flattened) when
  ``lr_scale="feature_norm"``; with ``lr_scale="none"`` both are absolute.
- The block stays in eval mode: BatchNorm normalises with the backbone's running statistics, which are
  not updated (mixed batches would otherwise shift them, and evaluation would depend on batch makeup);
  BatchNorm's affine parameters are trained.
- At every refresh the centroids (and so the gain) come from the current block's validation features; at
  every report the validation and test features (and the pool's, for pseudo-labels) are recomputed through
  the current block, by chunks and without gradients.
- :class:`FinetuneState` holds the block's weights and buffers and its momentum buffers: resume is exact.

Decided here: the best report is the first that reached the highest ``val/objective`` (``History.best_index``
reads it back from ``best_step``), so a tie keeps the earlier report. At that report the history also keeps
the predicted class of every validation and test image (``History.best_val_predictions``/
``best_test_predictions``, for paired comparisons): the arg-max the report computes for its counts anyway
(with a post-hoc correction, the cross-fitted validation predictions and the corrected test ones).

Importing this module needs numpy, torch and scipy only (no Ray, Optuna or pyarrow); it imports nothing
from the data layer (``data``, ``features``, ``backbones``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .checks import int_problem, is_int
from .config import FinetuneConfig
from .constants import METRIC_NAMES, SCORE_KEY, STEP_KEY
from .device import resolve_device
from .errors import ConfigError, TrainingError
from .featureset import FeatureSet
from .gain import gain_matrix
from .history import History, encode_array, sparse_counts
from .metrics import confusion_counts, joint_confusion, summarize
from .models import EVAL_CHUNK, build_model
from .objectives import get_objective
from .posthoc import cross_fitted_predictions, fit_correction
from .sampling import PairSampler, distribution_stats, pair_distribution

__all__ = ["FinetuneConfig", "FinetuneState", "History", "Trainer", "finetune", "finetune_repeats"]


# -- history and state -------------------------------------------------------------------------------


@dataclass
class FinetuneState:
    """Everything needed to resume a trial exactly where a report left it.

    ``save`` writes plain data (tensors, lists, strings) that ``torch.load(weights_only=True)`` accepts.
    """

    step: int  # SGD steps done (the step of the last report)
    refreshed_at: int  # step of the last refresh (-1: none yet)
    weight: torch.Tensor  # (K, d) float32 head weight, on CPU
    bias: torch.Tensor  # (K,) float32 head bias, on CPU
    velocity: dict  # SGD momentum buffers {"weight": (K, d), "bias": (K,), "block.<param>": ...} float32, CPU
    numpy_rng: dict  # numpy bit generator state (pairs, partners, erm instances)
    torch_rng: torch.Tensor  # torch.Generator state (mixing weights, boxes)
    objective: dict  # the objective's multipliers (state_dict)
    pseudo_labels: np.ndarray | None  # (n_unlabeled,) int64, -1 below the confidence threshold
    pair_distribution: np.ndarray | None  # (K, K) float64, the P in force
    diagnostics: dict  # p_entropy, p_max, g_max of that P
    history: History
    config: dict  # FinetuneConfig.to_dict() of the run that wrote it
    block_state: dict | None = None  # top-block mode: the block's state_dict (weights, BatchNorm buffers), CPU

    def save(self, path) -> None:
        def tensor(array):
            return None if array is None else torch.from_numpy(np.array(array))

        torch.save(
            {
                "step": self.step,
                "refreshed_at": self.refreshed_at,
                "weight": self.weight,
                "bias": self.bias,
                "velocity": self.velocity,
                "numpy_rng": json.dumps(self.numpy_rng),
                "torch_rng": self.torch_rng,
                "objective": json.dumps(self.objective),
                "pseudo_labels": tensor(self.pseudo_labels),
                "pair_distribution": _pack_distribution(self.pair_distribution),
                "diagnostics": dict(self.diagnostics),
                "history": self.history.to_json(),
                "config": json.dumps(self.config),
                "block_state": self.block_state,
            },
            path,
        )

    @classmethod
    def load(cls, path) -> FinetuneState:
        data = torch.load(path, map_location="cpu", weights_only=True)

        def array(value):
            return None if value is None else value.numpy()

        return cls(
            step=int(data["step"]),
            refreshed_at=int(data["refreshed_at"]),
            weight=data["weight"],
            bias=data["bias"],
            velocity=data["velocity"],
            numpy_rng=json.loads(data["numpy_rng"]),
            torch_rng=data["torch_rng"],
            objective=json.loads(data["objective"]),
            pseudo_labels=array(data["pseudo_labels"]),
            pair_distribution=_unpack_distribution(data["pair_distribution"]),
            diagnostics=dict(data["diagnostics"]),
            history=History.from_json(data["history"]),
            config=json.loads(data["config"]),
            block_state=data.get("block_state"),
        )


def _pack_distribution(P: np.ndarray | None) -> dict | None:
    """P (K, K) float64 as zlib-compressed bytes: most entries are the floor's one value, so at K = 1000
    its 8 MB take about 2.3 MB (states written before hold a float64 tensor; both load)."""
    if P is None:
        return None
    P = np.ascontiguousarray(P, dtype="<f8")
    return {"dtype": "float64", "shape": list(P.shape), "zlib": zlib.compress(P.tobytes(), 1)}


def _unpack_distribution(value) -> np.ndarray | None:
    if value is None or isinstance(value, torch.Tensor):
        return None if value is None else value.numpy()
    return np.frombuffer(zlib.decompress(value["zlib"]), dtype="<f8").astype(np.float64).reshape(value["shape"])


# -- the loop ----------------------------------------------------------------------------------------

BLOCK_BYTES = 32 * 2**20  # at most this much pre-drawn, mixed training data at a time


class Trainer:
    """One trial's model, objective, sampler and history; ``run_until(step)`` advances it report by report.

    The model is a :class:`~selmix_ray.models.HeadModel`, or a :class:`~selmix_ray.models.TopBlockModel`
    when ``features.block`` is not None (module docstring); the loop does not depend on which.

    Step-level API (what ``run_until`` is made of; benchmarks and tests use it):

    - :meth:`refresh`: validation confusion -> multipliers -> gain -> P, and pseudo-labels of the pool.
    - :meth:`train_steps`: n SGD steps with the P in force (no refresh, no report).
    - :meth:`logits`: (n, K) logits of the current model on ``"val"`` or ``"test"``.

    Args:
        features: the FeatureSet (numpy arrays, never written).
        config: the trial's :class:`FinetuneConfig`.
        state: a :class:`FinetuneState` to resume from (same config apart from ``device``).
    """

    def __init__(self, features: FeatureSet, config: FinetuneConfig, *, state: FinetuneState | None = None):
        self.features, self.config = features, config
        self.K = K = features.n_classes
        self.device = resolve_device(config.device)
        self.train_counts = features.train_counts
        self.objective = get_objective(config.objective, train_counts=self.train_counts, **config.objective_params)
        self.scorer = get_objective(config.objective, train_counts=self.train_counts, **config.objective_params)
        self.floor = 1.0 / (K + 1) if config.floor is None else config.floor
        self.rng = np.random.default_rng(config.seed)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        train_y = np.asarray(features.train.y, dtype=np.int64)
        self.sampler = None if config.method == "erm" else PairSampler(train_y, n_classes=K, rng=self.rng)
        self.model = build_model(features, config, device=self.device, rng=self.rng, generator=self.generator,
                                 sampler=self.sampler)

        self.step = 0
        self.refreshed_at = -1
        self.centroids: np.ndarray | None = None  # (K, d) float64 validation centroids of the last refresh
        self.pseudo_labels: np.ndarray | None = None
        self.P: np.ndarray | None = None
        self.diagnostics = {"p_entropy": math.nan, "p_max": math.nan, "g_max": math.nan}
        meta = {"config": config.to_dict(), "n_classes": K, "lr_effective": self.model.lr,
                "device": str(self.device), "train_counts": self.train_counts.tolist(), **self.model.meta}
        self.history = History(meta=meta)
        self._val_cache: tuple[int, Any] | None = None  # (step, validation logits) shared within a step
        self._checked_at = 0  # step of the last finiteness check of the model
        self.max_block = max(1, BLOCK_BYTES // (self.model.row_bytes * config.batch_size))  # steps drawn at once
        if state is not None:
            self._load(state)

    @property
    def weight(self) -> torch.Tensor:
        """(K, d) float32 head weight (the model's, on its device)."""
        return self.model.weight

    @property
    def bias(self) -> torch.Tensor:
        """(K,) float32 head bias."""
        return self.model.bias

    @property
    def block(self) -> torch.nn.Module | None:
        """The trainable top block (top-block mode), else None."""
        return self.model.block

    # -- public ----------------------------------------------------------------------------------

    def pending_report_steps(self) -> list[int]:
        """Report steps not reported yet: 0, eval_every, ..., steps."""
        done = self.history.records[-1]["step"] if self.history.records else -1
        return [t for t in range(0, self.config.steps + 1, self.config.eval_every) if t > done]

    def run_until(self, target: int) -> dict[str, float]:
        """Train up to step ``target`` (a pending report step), refreshing on the way; returns its report."""
        if target not in self.pending_report_steps():
            raise ValueError(f"step {target} is not a pending report step; pending: {self.pending_report_steps()}.")
        config = self.config
        while True:
            due = self.step % config.refresh_every == 0 and self.refreshed_at != self.step
            if due and (self.step < config.steps or self.step == 0):
                self._refresh()
            if self.step == target:
                break
            next_refresh = (self.step // config.refresh_every + 1) * config.refresh_every
            self._train(min(next_refresh, target, self.step + self.max_block) - self.step)
        return self._report()

    def refresh(self) -> None:
        """Refresh now, validation pass included (even if this step's validation logits are known)."""
        self._val_cache = None
        self._refresh()

    def train_steps(self, n: int) -> None:
        """``n`` SGD steps with the P and pseudo-labels in force, drawn ``max_block`` steps at a time; no
        refresh and no report (``run_until`` interleaves those)."""
        if not is_int(n) or n < 0 or self.step + n > self.config.steps:
            raise ValueError(f"n must be an integer in [0, steps - step] = [0, {self.config.steps - self.step}], "
                             f"but got {n=}.")
        end = self.step + n
        while self.step < end:
            self._train(min(end - self.step, self.max_block))

    def logits(self, split: str = "val") -> np.ndarray:
        """(n, K) float32 logits of the current model on ``"val"`` or ``"test"`` (validation: once per step)."""
        if split == "test":
            return _logits(self.model.features("test"), self.weight, self.bias)
        if split != "val":
            raise ValueError(f"split must be 'val' or 'test', but got {split=!r}.")
        if self._val_cache is None or self._val_cache[0] != self.step:
            self._val_cache = (self.step, _logits(self.model.features("val"), self.weight, self.bias))
        return self._val_cache[1]

    def state(self) -> FinetuneState:
        """A snapshot that resumes this trial exactly (CPU copies)."""
        return FinetuneState(
            step=self.step,
            refreshed_at=self.refreshed_at,
            **self.model.state(),
            numpy_rng=self.rng.bit_generator.state,
            torch_rng=self.generator.get_state(),
            objective=self.objective.state_dict(),
            pseudo_labels=None if self.pseudo_labels is None else self.pseudo_labels.copy(),
            pair_distribution=None if self.P is None else self.P.copy(),
            diagnostics=dict(self.diagnostics),
            history=self.history.copy(),
            config=self.config.to_dict(),
        )

    # -- steps of the loop -------------------------------------------------------------------------

    def _train(self, n_steps: int) -> None:
        """``n_steps`` SGD steps from one draw (P, the pseudo-labels and the mixing do not depend on the
        model, so a refresh interval's batches are drawn, gathered and mixed at once)."""
        B, step = self.config.batch_size, self.model.step
        for batch in self.model.draw(n_steps * B).split(B):
            step(batch, self.step)
            self.step += 1

    def _refresh(self) -> None:
        """Validation confusion -> multipliers -> gain -> P, and pseudo-labels of the pool."""
        self._check_finite()
        config, K = self.config, self.K
        if config.method == "selmix":
            C = joint_confusion(confusion_counts(self.features.val.y, self.logits("val").argmax(axis=1), K))
            self.objective.update(C)
            self.centroids = self.model.centroids()
            weight = self.weight.detach().cpu().double().numpy()
            bias = self.bias.detach().cpu().double().numpy()
            G = gain_matrix(
                C, self.centroids, weight, bias, self.objective, lambda_min=config.lambda_min,
                form=config.gain_form, train_bias=config.train_bias, jacobian=config.jacobian,
                target="soft" if config.mixup == "feature_soft" else "hard",
            )
            self.P = pair_distribution(G, s=config.s, positive_only=config.positive_only, floor=self.floor,
                                       normalize=config.gain_scale == "max")
            self.diagnostics = {**distribution_stats(self.P), "g_max": float(G.max())}
        elif config.method == "uniform_mixup" and self.P is None:
            self.P = np.full((K, K), 1.0 / (K * K))
            self.diagnostics = {**distribution_stats(self.P), "g_max": math.nan}
        if self.model.has_pool:
            predictions, confidence = self._pool_predictions()
            self.pseudo_labels = np.where(confidence >= config.pseudo_label_threshold, predictions, -1)
        self._install_sampler()
        self.refreshed_at = self.step

    def _report(self) -> dict[str, float]:
        """Evaluate validation and test, update the best-so-far, append a record; returns the scalars."""
        self._check_finite()
        config, K = self.config, self.K
        val_y, test_y = self.features.val.y, self.features.test.y
        splits = {}
        if config.posthoc == "none":
            val_pred = self.logits("val").argmax(axis=1)
            test_pred = _predict(self.model.features("test"), self.weight, self.bias)
        else:
            val_logits, test_logits = self.logits("val"), self.logits("test")
            splits["val_raw"] = confusion_counts(val_y, val_logits.argmax(axis=1), K)
            splits["test_raw"] = confusion_counts(test_y, test_logits.argmax(axis=1), K)
            # val/*: cross-fitted on validation halves; test/*: the correction fitted on all of validation.
            # (posthoc deep-copies the objective: the training multipliers are never touched)
            val_pred = cross_fitted_predictions(
                config.posthoc, val_logits, val_y, self.scorer, train_counts=self.train_counts,
                n_classes=K, seed=config.seed,
            )
            correction = fit_correction(config.posthoc, val_logits, val_y, self.scorer,
                                        train_counts=self.train_counts)
            test_pred = correction.apply(test_logits).argmax(axis=1)
        splits["val"] = confusion_counts(val_y, val_pred, K)  # val_pred, test_pred: (n_val,), (n_test,)
        splits["test"] = confusion_counts(test_y, test_pred, K)

        metrics: dict[str, float] = {STEP_KEY: float(self.step)}
        record: dict[str, Any] = {"step": self.step, "metrics": metrics}
        if config.posthoc != "none":
            record["posthoc"] = correction.params  # the test-time correction (kind, offsets, ...)
        for name in ("val", "test", "val_raw", "test_raw"):
            if name not in splits:
                continue
            summary = summarize(splits[name], train_counts=self.train_counts, objective=self.scorer)
            prefix = name.replace("_raw", "/raw")
            for m in METRIC_NAMES:
                metrics[f"{prefix}/{m}"] = float(summary[m])
            record[name] = {"recall": encode_array(summary["recall"]), "counts": sparse_counts(splits[name])}

        # the best report: the first that reached the best validation objective (History.best_index)
        best = self.history.records[self.history.best_index()] if self.history.records else None
        if best is None or metrics["val/objective"] > best["metrics"]["val/objective"]:
            best = record
            self.history.best_p = None if self.P is None else self.P.astype(np.float32)
            self.history.best_step = self.step
            self.history.best_val_predictions = np.asarray(val_pred, dtype=np.int64)  # per image, for pairing
            self.history.best_test_predictions = np.asarray(test_pred, dtype=np.int64)
        metrics[SCORE_KEY] = best["metrics"]["val/objective"]
        for m in METRIC_NAMES:
            metrics[f"test_at_best/{m}"] = best["metrics"][f"test/{m}"]
        metrics.update(self.diagnostics)
        self.history.records.append(record)
        return dict(metrics)

    # -- helpers -----------------------------------------------------------------------------------

    def _pool_predictions(self) -> tuple[np.ndarray, np.ndarray]:
        """Arg-max class (m,) and its softmax probability (m,) on the unlabeled pool, by chunks."""
        predictions, confidence = [], []
        pool_x = self.model.features("pool")
        with torch.no_grad():
            for start in range(0, pool_x.shape[0], EVAL_CHUNK):
                logits = torch.nn.functional.linear(pool_x[start:start + EVAL_CHUNK].float(), self.weight,
                                                    self.bias)
                top = torch.softmax(logits, dim=1).max(dim=1)
                predictions.append(top.indices.cpu().numpy())
                confidence.append(top.values.cpu().numpy())
        return np.concatenate(predictions), np.concatenate(confidence)

    def _install_sampler(self) -> None:
        if self.sampler is None:
            return
        if self.model.has_pool:
            self.sampler.set_pool_labels(self.pseudo_labels)
        if self.P is not None:
            self.sampler.set_distribution(self.P)

    def _check_finite(self) -> None:
        """Raise TrainingError if the model (hence some loss since the last check) is NaN/inf."""
        if not self.model.is_finite():
            raise TrainingError(
                f"Training diverged: the loss and the head became NaN/inf between steps {self._checked_at} and "
                f"{self.step} ({self.model.describe_rates()}, method={self.config.method!r}). "
                "Lower lr (or top_lr), keep lr_scale='feature_norm', or check the features for NaN/inf."
            )
        self._checked_at = self.step

    def _load(self, state: FinetuneState) -> None:
        mine = {k: v for k, v in self.config.to_dict().items() if k != "device"}
        defaults = FinetuneConfig().to_dict()  # a field the state predates (e.g. top_lr) had its default
        theirs = {k: state.config.get(k, defaults[k]) for k in mine} | {
            k: v for k, v in state.config.items() if k not in mine and k != "device"}
        if mine != theirs:
            changed = sorted(k for k in mine if mine.get(k) != theirs.get(k))
            raise ConfigError(
                f"Cannot resume: the state was saved with a different config (fields {', '.join(changed)} differ). "
                "Resume with the config that wrote the state."
            )
        self.model.load(weight=state.weight, bias=state.bias, velocity=state.velocity, block_state=state.block_state)
        self.rng.bit_generator.state = state.numpy_rng
        self.generator.set_state(state.torch_rng)
        self.objective.load_state_dict(state.objective)
        self.step, self.refreshed_at = state.step, state.refreshed_at
        self.pseudo_labels = None if state.pseudo_labels is None else np.asarray(state.pseudo_labels)
        self.P = None if state.pair_distribution is None else np.asarray(state.pair_distribution)
        self.diagnostics = dict(state.diagnostics)
        self.history = state.history.copy()
        self._checked_at = self.step
        self._install_sampler()


def finetune(
    features: FeatureSet,
    config: FinetuneConfig,
    *,
    report=None,
    checkpoint=None,
    state: FinetuneState | None = None,
) -> History:
    """Run one trial (docs/method.md, One trial) and return its History.

    Args:
        features: a FeatureSet (e.g. ``FeatureSet.from_object_store(...)``; arrays are only read).
        config: the trial's FinetuneConfig.
        report: ``report(metrics: dict[str, float])`` at step 0, every ``eval_every`` steps and the end.
        checkpoint: ``checkpoint(state: FinetuneState)``, called right after each report.
        state: resume from this state (written by a run with the same config).
    """
    trainer = Trainer(features, config, state=state)
    for step in trainer.pending_report_steps():
        metrics = trainer.run_until(step)
        if report is not None:
            report(metrics)
        if checkpoint is not None:
            checkpoint(trainer.state())
    return trainer.history


def finetune_repeats(
    features: FeatureSet,
    config: FinetuneConfig,
    *,
    repeats: int,
    report=None,
    checkpoint=None,
    state: list[FinetuneState] | None = None,
) -> list[History]:
    """Train ``repeats`` copies with seeds seed, ..., seed + repeats - 1 in lockstep.

    ``report`` receives the mean of each scalar over the copies; ``checkpoint`` the list of the copies'
    states (pass it back as ``state`` to resume). Returns each copy's History.
    """
    if int_problem("repeats", repeats, minimum=1):
        raise ConfigError(int_problem("repeats", repeats, minimum=1))
    states = list(state) if state is not None else [None] * repeats
    if len(states) != repeats:
        raise ConfigError(f"state holds {len(states)} copies, but {repeats=}; resume with the same repeats.")
    trainers = [
        Trainer(features, dataclasses.replace(config, seed=config.seed + r), state=states[r]) for r in range(repeats)
    ]
    for step in trainers[0].pending_report_steps():
        reports = [trainer.run_until(step) for trainer in trainers]
        mean = {key: float(np.mean([r[key] for r in reports])) for key in reports[0]}
        if report is not None:
            report(mean)
        if checkpoint is not None:
            checkpoint([trainer.state() for trainer in trainers])
    return [trainer.history for trainer in trainers]


# -- evaluation ------------------------------------------------------------------------------------


def _logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> np.ndarray:
    """(n, K) float32 numpy logits of the head, computed by chunks."""
    with torch.no_grad():
        parts = [torch.nn.functional.linear(x[s:s + EVAL_CHUNK].float(), weight, bias).cpu()
                 for s in range(0, x.shape[0], EVAL_CHUNK)]
    return torch.cat(parts).numpy()


def _predict(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> np.ndarray:
    """(n,) arg-max class of the head, by chunks (never holds all (n, K) logits)."""
    with torch.no_grad():
        parts = [torch.nn.functional.linear(x[s:s + EVAL_CHUNK].float(), weight, bias).argmax(dim=1).cpu()
                 for s in range(0, x.shape[0], EVAL_CHUNK)]
    return torch.cat(parts).numpy()
