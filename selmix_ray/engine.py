"""The SelMix fine-tuning loop: one trial, no Ray (SPEC.md section 7).

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

Top-block mode (SPEC.md section 13) is on when the FeatureSet carries a block payload (``features.block``,
from ``build_features(..., cut="block")``): the cut point comes from the features, not from the config.
Each split's ``maps`` (n, C, H, W) are then the input of the backbone's last block, and the trial trains a
fresh copy of that block (``backbones.build_block``) together with the head:

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

Importing this module needs numpy, torch and scipy only (no Ray, Optuna or pyarrow).
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .block import build_block
from .config import FinetuneConfig
from .constants import METRIC_NAMES, SCORE_KEY, STEP_KEY
from .device import resolve_device
from .errors import ConfigError, DataError, TrainingError
from .featureset import FeatureSet
from .gain import class_centroids, gain_matrix
from .history import History, sparse_counts
from .metrics import confusion_counts, joint_confusion, summarize
from .mixup import mix, needs_maps, targets
from .objectives import get_objective
from .posthoc import cross_fitted_confusion, fit_correction
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
                "pair_distribution": tensor(self.pair_distribution),
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
            pair_distribution=array(data["pair_distribution"]),
            diagnostics=dict(data["diagnostics"]),
            history=History.from_json(data["history"]),
            config=json.loads(data["config"]),
            block_state=data.get("block_state"),
        )


# -- the loop ----------------------------------------------------------------------------------------

EVAL_CHUNK = 8192  # rows per evaluation chunk (bounds the (chunk, K) logits in memory)
NORM_CHUNK = 1024  # rows per chunk of the feature-norm mean behind lr_scale='feature_norm'
BLOCK_BYTES = 32 * 2**20  # at most this much pre-drawn, mixed training data at a time
TOP_BLOCK_EVAL_BYTES = 64 * 2**20  # top-block mode: at most this much float32 input map per evaluation chunk


class Trainer:
    """One trial's head (and top block), optimiser, sampler and history; ``run_until(step)`` advances it
    report by report. Top-block mode is on when ``features.block`` is not None (module docstring).

    Args:
        features: the FeatureSet (numpy arrays, never written).
        config: the trial's :class:`FinetuneConfig`.
        state: a :class:`FinetuneState` to resume from (same config apart from ``device``).
    """

    def __init__(self, features: FeatureSet, config: FinetuneConfig, *, state: FinetuneState | None = None):
        self.features, self.config = features, config
        self.K = K = features.n_classes
        self.device = resolve_device(config.device)
        self.uses_pairs = config.method != "erm"
        self.uses_maps = self.uses_pairs and needs_maps(config.mixup)  # mixing happens on the cached maps
        if self.uses_maps and not features.has_maps:
            raise ConfigError(
                f"mixup {config.mixup!r} needs spatial maps, but this FeatureSet has none; build the features "
                "with keep_maps=True or use mixup='feature'."
            )
        self.block: torch.nn.Module | None = None  # top-block mode: the trainable last block
        if features.block is not None:
            if not features.has_maps:
                raise DataError(
                    "This FeatureSet carries a top block but not every split has maps (its input); rebuild the "
                    "features with cut='block'."
                )
            self.block = build_block(features.block).to(self.device).eval()
        self.train_counts = features.train_counts
        self.objective = get_objective(config.objective, train_counts=self.train_counts, **config.objective_params)
        self.scorer = get_objective(config.objective, train_counts=self.train_counts, **config.objective_params)
        self.floor = 1.0 / (K + 1) if config.floor is None else config.floor

        # Shared read-only arrays as tensors (no host copy; one device copy on CUDA).
        self.train_y = np.asarray(features.train.y, dtype=np.int64)
        self.train_x = _tensor(features.train.x, self.device)
        maps_needed = self.uses_maps or self.block is not None
        self.train_maps = _tensor(features.train.maps, self.device) if maps_needed else None
        self.val_x, self.test_x = _tensor(features.val.x, self.device), _tensor(features.test.x, self.device)
        self.val_maps = _tensor(features.val.maps, self.device) if self.block is not None else None
        self.test_maps = _tensor(features.test.maps, self.device) if self.block is not None else None
        pool = features.unlabeled if self.uses_pairs and features.unlabeled is not None and len(features.unlabeled) else None
        self.pool_x = None if pool is None else _tensor(pool.x, self.device)
        self.pool_maps = _tensor(pool.maps, self.device) if pool is not None and maps_needed else None
        self.centroids = None  # (K, d) float64 validation centroids (recomputed at each refresh with a block)
        if config.method == "selmix" and self.block is None:
            self.centroids = class_centroids(features.val.x, features.val.y, K)

        self.lr = config.lr
        self.top_lr = config.top_lr if self.block is not None else 0.0
        if config.lr_scale == "feature_norm":
            self.lr = config.lr / _mean_squared_norm(self.train_x)
            if self.block is not None:
                self.top_lr = config.top_lr / _mean_squared_norm(self.train_maps)
        # The head and its SGD momentum buffers (explicit gradients: no autograd, no torch.optim).
        self.weight = torch.tensor(np.asarray(features.weight), dtype=torch.float32, device=self.device)  # (K, d)
        self.bias = torch.tensor(np.asarray(features.bias), dtype=torch.float32, device=self.device)  # (K,)
        self.velocity = {"weight": torch.zeros_like(self.weight), "bias": torch.zeros_like(self.bias)}
        if self.block is not None:
            self._check_block_output(features.dim)
            for name, param in self.block.named_parameters():
                self.velocity[f"block.{name}"] = torch.zeros_like(param)
        self.rng = np.random.default_rng(config.seed)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.sampler = PairSampler(self.train_y, n_classes=K, rng=self.rng) if self.uses_pairs else None

        self.step = 0
        self.refreshed_at = -1
        self.pseudo_labels: np.ndarray | None = None
        self.P: np.ndarray | None = None
        self.diagnostics = {"p_entropy": math.nan, "p_max": math.nan, "g_max": math.nan}
        meta = {"config": config.to_dict(), "n_classes": K, "lr_effective": self.lr, "device": str(self.device),
                "train_counts": self.train_counts.tolist()}
        if self.block is not None:
            meta.update(cut="block", top_lr_effective=self.top_lr)
        self.history = History(meta=meta)
        self._val_cache: tuple[int, Any] | None = None  # (step, validation outputs) shared within a step
        self._val_features_cache: tuple[int, torch.Tensor] | None = None  # top-block mode: (step, (n_val, d))
        self._checked_at = 0  # step of the last finiteness check of the head
        if self.block is not None:  # anchor and partner maps of every drawn sample (or one mixed map)
            row_bytes = 4 * (self.K + 2 * int(np.prod(self.train_maps.shape[1:])))
        else:
            row_bytes = 4 * (self.K + (int(np.prod(self.train_maps.shape[1:])) if self.uses_maps else features.dim))
        self.max_block = max(1, BLOCK_BYTES // (row_bytes * config.batch_size))  # steps drawn at once
        if state is not None:
            self._load(state)

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
            self._train_block(min(next_refresh, target, self.step + self.max_block) - self.step)
        return self._report()

    def state(self) -> FinetuneState:
        """A snapshot that resumes this trial exactly (CPU copies)."""
        return FinetuneState(
            step=self.step,
            refreshed_at=self.refreshed_at,
            weight=self.weight.cpu().clone(),
            bias=self.bias.cpu().clone(),
            velocity={name: v.cpu().clone() for name, v in self.velocity.items()},
            numpy_rng=self.rng.bit_generator.state,
            torch_rng=self.generator.get_state(),
            objective=self.objective.state_dict(),
            pseudo_labels=None if self.pseudo_labels is None else self.pseudo_labels.copy(),
            pair_distribution=None if self.P is None else self.P.copy(),
            diagnostics=dict(self.diagnostics),
            history=History.from_json(self.history.to_json()),
            config=self.config.to_dict(),
            block_state=None if self.block is None else {
                name: value.detach().cpu().clone() for name, value in self.block.state_dict().items()},
        )

    # -- steps of the loop -------------------------------------------------------------------------

    def _train_block(self, n_steps: int) -> None:
        """``n_steps`` SGD steps within one refresh interval, never across a report.

        P, the pseudo-labels and the mixing do not depend on the head, so the block's batches are drawn,
        gathered and mixed at once (fewer, larger tensor operations); only the SGD steps run one by one.
        """
        B = self.config.batch_size
        if self.block is not None:
            (anchor, partner, lam), target = self._draw_block_batches(n_steps * B)
            for k in range(n_steps):
                rows = slice(k * B, (k + 1) * B)
                self._block_sgd_step(anchor[rows], None if partner is None else partner[rows],
                                     None if lam is None else lam[rows], target[rows])
                self.step += 1
            return
        z, target = self._draw_batches(n_steps * B)  # (n B, d), (n B, K)
        for k in range(n_steps):
            self._sgd_step(z[k * B:(k + 1) * B], target[k * B:(k + 1) * B])
            self.step += 1

    def _draw_batches(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n training inputs (n, d) float32 and their targets (n, K): mixed pairs, or instances for erm."""
        config = self.config
        if config.method == "erm":
            index = self.rng.integers(0, len(self.train_y), size=n)
            labels = torch.from_numpy(self.train_y[index]).to(self.device)
            return _rows(self.train_x, index, self.device).float(), torch.nn.functional.one_hot(labels, self.K).float()
        batch = self.sampler.sample(n)
        train, pool = (self.train_maps, self.pool_maps) if self.uses_maps else (self.train_x, self.pool_x)
        a = _rows(train, batch.anchor_index, self.device).float()  # (n, d) or (n, C, H, W)
        b = _partners(train, pool, batch.partner_index, batch.partner_from_pool, self.device)
        lam = torch.rand(n, generator=self.generator, device=self.device)
        lam = config.lambda_min + (1.0 - config.lambda_min) * lam  # U(lambda_min, 1)
        mixed, lam_eff = mix(config.mixup, a, b, lam, generator=self.generator)
        z = mixed.mean(dim=(2, 3)) if self.uses_maps else mixed  # head = global pool + linear
        pairs = torch.from_numpy(batch.pairs).to(self.device)
        return z, targets(config.mixup, pairs[:, 0], pairs[:, 1], lam_eff, self.K).float()

    def _draw_block_batches(self, n: int):
        """Top-block mode: n training samples as ((anchor, partner, lam), targets (n, K)).

        ``anchor`` (n, C, H, W) float32 maps; for ``feature``/``feature_soft`` ``partner`` (n, C, H, W) and
        ``lam`` (n,) say how the block's outputs are mixed; for ``cutmix``/``puzzlemix`` the maps are
        already mixed and ``erm`` draws single instances (``partner`` and ``lam`` None). The random draws
        are those of :meth:`_draw_batches`, in the same order.
        """
        config = self.config
        if config.method == "erm":
            index = self.rng.integers(0, len(self.train_y), size=n)
            labels = torch.from_numpy(self.train_y[index]).to(self.device)
            maps = _rows(self.train_maps, index, self.device).float()
            return (maps, None, None), torch.nn.functional.one_hot(labels, self.K).float()
        batch = self.sampler.sample(n)
        a = _rows(self.train_maps, batch.anchor_index, self.device).float()  # (n, C, H, W)
        b = _partners(self.train_maps, self.pool_maps, batch.partner_index, batch.partner_from_pool, self.device)
        lam = torch.rand(n, generator=self.generator, device=self.device)
        lam = config.lambda_min + (1.0 - config.lambda_min) * lam  # U(lambda_min, 1)
        pairs = torch.from_numpy(batch.pairs).to(self.device)
        if self.uses_maps:
            mixed, lam_eff = mix(config.mixup, a, b, lam, generator=self.generator)
            return (mixed, None, None), targets(config.mixup, pairs[:, 0], pairs[:, 1], lam_eff, self.K).float()
        return (a, b, lam), targets(config.mixup, pairs[:, 0], pairs[:, 1], lam, self.K).float()

    def _block_sgd_step(self, anchor, partner, lam, target) -> None:
        """One SGD step of the head and the top block (see :meth:`_draw_block_batches` for the inputs).

        The head's gradient is explicit as in :meth:`_sgd_step`; the block's comes from autograd, by
        back-propagating d(mean CE)/dz = residual @ W through the block (and the feature mixing).
        """
        config, B = self.config, anchor.shape[0]
        params = dict(self.block.named_parameters())
        with torch.enable_grad():
            if partner is None:
                z = self.block(anchor)  # (B, d)
            else:
                both = self.block(torch.cat([anchor, partner]))  # one pass over the 2 B maps
                z, _ = mix(config.mixup, both[:B], both[B:], lam, generator=self.generator)
            probs = torch.softmax(torch.nn.functional.linear(z.detach(), self.weight, self.bias), dim=1)
            residual = probs.sub_(target).div_(B)  # (B, K)
            block_grads = torch.autograd.grad(z, list(params.values()), grad_outputs=residual @ self.weight)
        z = z.detach()
        grads = {"weight": residual.T @ z, "bias": residual.sum(dim=0)}
        grads.update({f"block.{name}": g for name, g in zip(params, block_grads)})
        cosine = 0.5 * (1.0 + math.cos(math.pi * self.step / config.steps))
        with torch.no_grad():
            for name, param in (("weight", self.weight), ("bias", self.bias),
                                *((f"block.{n}", p) for n, p in params.items())):
                if name == "bias" and not config.train_bias:
                    continue
                grad = grads[name].add_(param, alpha=config.weight_decay)  # as torch.optim.SGD (dampening 0)
                if config.momentum:
                    grad = self.velocity[name].mul_(config.momentum).add_(grad)
                lr = self.top_lr if name.startswith("block.") else self.lr
                param.add_(grad, alpha=-lr * cosine)

    def _sgd_step(self, z: torch.Tensor, target: torch.Tensor) -> None:
        """One SGD step of cross-entropy on (B, d) inputs and (B, K) targets; cosine lr over ``steps``.

        The gradient is explicit: d(mean CE)/d(logits) = (softmax - target) / B. A NaN/inf loss makes the
        head NaN/inf, which ``_check_finite`` catches at the next refresh or report.
        """
        config, B = self.config, z.shape[0]
        probs = torch.softmax(torch.nn.functional.linear(z, self.weight, self.bias), dim=1)  # (B, K)
        residual = probs.sub_(target).div_(B)  # (B, K)
        grads = {"weight": residual.T @ z, "bias": residual.sum(dim=0)}
        lr = self.lr * 0.5 * (1.0 + math.cos(math.pi * self.step / config.steps))
        for name, param in (("weight", self.weight), ("bias", self.bias)):
            if name == "bias" and not config.train_bias:
                continue
            grad = grads[name].add_(param, alpha=config.weight_decay)  # as torch.optim.SGD (dampening 0)
            if config.momentum:
                grad = self.velocity[name].mul_(config.momentum).add_(grad)
            param.add_(grad, alpha=-lr)

    def _refresh(self) -> None:
        """Validation confusion -> multipliers -> gain -> P, and pseudo-labels of the pool."""
        self._check_finite()
        config, K = self.config, self.K
        if config.method == "selmix":
            C = joint_confusion(confusion_counts(self.features.val.y, self._val_predictions(), K))
            self.objective.update(C)
            if self.block is not None:  # the features move with the block
                self.centroids = class_centroids(self._val_features().double().cpu().numpy(),
                                                 self.features.val.y, K)
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
        if self.pool_x is not None:
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
            splits["val"] = confusion_counts(val_y, self._val_predictions(), K)
            splits["test"] = confusion_counts(test_y, _predict(self._test_features(), self.weight, self.bias), K)
        else:
            val_logits = self._val_logits()
            test_logits = _logits(self._test_features(), self.weight, self.bias)
            splits["val_raw"] = confusion_counts(val_y, val_logits.argmax(axis=1), K)
            splits["test_raw"] = confusion_counts(test_y, test_logits.argmax(axis=1), K)
            # val/*: cross-fitted on validation halves; test/*: the correction fitted on all of validation.
            # (posthoc deep-copies the objective: the training multipliers are never touched)
            splits["val"] = cross_fitted_confusion(
                config.posthoc, val_logits, val_y, self.scorer, train_counts=self.train_counts,
                n_classes=K, seed=config.seed,
            )
            correction = fit_correction(config.posthoc, val_logits, val_y, self.scorer,
                                        train_counts=self.train_counts)
            splits["test"] = confusion_counts(test_y, correction.apply(test_logits).argmax(axis=1), K)

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
            record[name] = {"recall": summary["recall"].tolist(), "counts": sparse_counts(splits[name])}

        best = self._best_record()
        if best is None or metrics["val/objective"] > best["metrics"]["val/objective"]:
            best = record
            self.history.best_p = None if self.P is None else self.P.astype(np.float32)
            self.history.best_step = self.step
        metrics[SCORE_KEY] = best["metrics"]["val/objective"]
        for m in METRIC_NAMES:
            metrics[f"test_at_best/{m}"] = best["metrics"][f"test/{m}"]
        metrics.update(self.diagnostics)
        self.history.records.append(record)
        return dict(metrics)

    # -- helpers -----------------------------------------------------------------------------------

    def _best_record(self) -> dict | None:
        best = None
        for record in self.history.records:  # the first report that reached the best value
            if best is None or record["metrics"]["val/objective"] > best["metrics"]["val/objective"]:
                best = record
        return best

    def _val_logits(self) -> np.ndarray:
        """(n_val, K) float32 logits of the current head, computed once per step (refresh and report)."""
        if self._val_cache is None or self._val_cache[0] != self.step:
            self._val_cache = (self.step, _logits(self._val_features(), self.weight, self.bias))
        return self._val_cache[1]

    def _val_features(self) -> torch.Tensor:
        """(n_val, d) validation features: the cached ``x``, or (top block) the current block's, once per step."""
        if self.block is None:
            return self.val_x
        if self._val_features_cache is None or self._val_features_cache[0] != self.step:
            self._val_features_cache = (self.step, self._block_features(self.val_maps))
        return self._val_features_cache[1]

    def _test_features(self) -> torch.Tensor:
        """(n_test, d) test features: the cached ``x``, or the current block's outputs on the test maps."""
        return self.test_x if self.block is None else self._block_features(self.test_maps)

    def _block_features(self, maps: torch.Tensor) -> torch.Tensor:
        """(n, d) float32 outputs of the current block on (n, C, H, W) maps, by chunks, without gradients."""
        rows = max(1, TOP_BLOCK_EVAL_BYTES // (4 * int(np.prod(maps.shape[1:]))))
        with torch.no_grad():
            parts = [self.block(maps[s:s + rows].to(self.device).float()) for s in range(0, maps.shape[0], rows)]
        return torch.cat(parts)

    def _check_block_output(self, dim: int) -> None:
        """The block must map a cached map to the head's d features (checked on one training map)."""
        shape = tuple(self._block_features(self.train_maps[:1]).shape)
        if shape != (1, dim):
            raise DataError(
                f"The top block maps a cached map to features of shape {shape[1:]}, but the head expects ({dim},); "
                "the FeatureSet's block payload and its x/weight disagree: rebuild the features with cut='block'."
            )

    def _val_predictions(self) -> np.ndarray:
        return self._val_logits().argmax(axis=1)

    def _pool_predictions(self) -> tuple[np.ndarray, np.ndarray]:
        """Arg-max class (m,) and its softmax probability (m,) on the unlabeled pool, by chunks."""
        predictions, confidence = [], []
        pool_x = self.pool_x if self.block is None else self._block_features(self.pool_maps)
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
        if self.pool_x is not None:
            self.sampler.set_pool_labels(self.pseudo_labels)
        if self.P is not None:
            self.sampler.set_distribution(self.P)

    def _check_finite(self) -> None:
        """Raise TrainingError if the head (hence some loss since the last check) is NaN/inf."""
        total = self.weight.sum() + self.bias.sum()  # any NaN/inf makes the sum NaN/inf
        if self.block is not None:
            total = total + sum(param.detach().sum() for param in self.block.parameters())
        if not math.isfinite(float(total)):
            top = f", top_lr={self.config.top_lr}" if self.block is not None else ""
            raise TrainingError(
                f"Training diverged: the loss and the head became NaN/inf between steps {self._checked_at} and "
                f"{self.step} (lr={self.config.lr}{top}, effective lr={self.lr:.3g}, method={self.config.method!r}). "
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
        if tuple(state.weight.shape) != tuple(self.weight.shape):
            raise DataError(
                f"Cannot resume: the state's head has shape {tuple(state.weight.shape)}, these features need "
                f"{tuple(self.weight.shape)}."
            )
        if (state.block_state is None) != (self.block is None):
            saved, here = ("a top block", "none") if self.block is None else ("no top block", "one")
            raise DataError(
                f"Cannot resume: the state was saved with {saved}, these features have {here}; resume on the "
                "features (cut) that wrote the state."
            )
        self.weight.copy_(state.weight)
        self.bias.copy_(state.bias)
        if self.block is not None:
            self.block.load_state_dict(state.block_state, strict=True)
        for name, velocity in self.velocity.items():
            velocity.copy_(state.velocity[name])
        self.rng.bit_generator.state = state.numpy_rng
        self.generator.set_state(state.torch_rng)
        self.objective.load_state_dict(state.objective)
        self.step, self.refreshed_at = state.step, state.refreshed_at
        self.pseudo_labels = None if state.pseudo_labels is None else np.asarray(state.pseudo_labels)
        self.P = None if state.pair_distribution is None else np.asarray(state.pair_distribution)
        self.diagnostics = dict(state.diagnostics)
        self.history = History.from_json(state.history.to_json())
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
    """Run one trial (SPEC.md section 7) and return its History.

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
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be an integer >= 1, but got {repeats=}.")
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


# -- tensors -----------------------------------------------------------------------------------------


def _tensor(array: np.ndarray | None, device: torch.device) -> torch.Tensor | None:
    """Wrap a (possibly read-only) numpy array without copying; on CUDA, one copy onto the device."""
    if array is None:
        return None
    with warnings.catch_warnings():  # read-only shared memory: we never write to it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(np.asarray(array))
    return tensor if device.type == "cpu" else tensor.to(device)


def _rows(x: torch.Tensor, index: np.ndarray, device: torch.device) -> torch.Tensor:
    """x[index] (a copy of the batch only), on ``device`` (x lives there already, or on the CPU)."""
    index = torch.from_numpy(np.asarray(index, dtype=np.int64))
    if x.device.type != "cpu":
        index = index.to(x.device, non_blocking=True)
    return x.index_select(0, index).to(device)


def _partners(train, pool, index, from_pool, device) -> torch.Tensor:
    """Partner rows (B, ...) float32: from the pool where ``from_pool``, else from the labeled set."""
    if pool is None or not from_pool.any():
        return _rows(train, index, device).float()
    out = torch.empty((len(index),) + tuple(train.shape[1:]), dtype=torch.float32, device=device)
    mask = torch.from_numpy(from_pool).to(device)
    out[mask] = _rows(pool, index[from_pool], device).float()
    out[~mask] = _rows(train, index[~from_pool], device).float()
    return out


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


def _mean_squared_norm(x: torch.Tensor) -> float:
    """mean ||z||^2 over the rows of x: float32 per row, summed in float64 by chunks of NORM_CHUNK rows.

    Small chunks keep the transient copy to a few MiB even for (n, C, H, W) maps (float64 chunks of 8192
    rows, as before, left 4 Ray trial workers at 1.41x the feature bytes above a 1 MiB-feature worker;
    this gives 1.12x: ``benchmarks/bench_sweep.py memory``).
    """
    total = 0.0
    for s in range(0, x.shape[0], NORM_CHUNK):
        chunk = x[s:s + NORM_CHUNK].float().flatten(1)  # (rows, d) or (rows, C*H*W)
        total += float(torch.linalg.vector_norm(chunk, dim=1).double().square().sum())
    mean = total / max(x.shape[0], 1)
    if not mean > 0 or not math.isfinite(mean):
        raise DataError(
            f"lr_scale='feature_norm' needs a finite positive mean squared feature norm, but got {mean!r}; "
            "check the training features or use lr_scale='none'."
        )
    return mean

