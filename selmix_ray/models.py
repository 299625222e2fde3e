"""What a trial trains: the linear head on cached features, or the top block together with the head.

The loop (:mod:`selmix_ray.engine`) sees one interface and never asks which model it has:

- ``features(split)``: (n, d) float features of ``"val"``, ``"test"`` or ``"pool"`` (the unlabeled pool) as the
  model sees them now (the cached ``x``, or the current block's outputs on the cached maps).
- ``draw(n)``: n training samples (a :class:`Batch`), from the pair sampler (mixed pairs) or, for ``erm``,
  uniform instances.
- ``step(batch, at)``: one SGD step on a :class:`Batch` of B samples at step ``at`` of the cosine schedule.
- ``centroids()``, ``is_finite()``, ``state()`` / ``load(...)``, and ``lr``, ``meta``, ``row_bytes``.

:class:`HeadModel` (head-only mode) mixes at draw time, so that a refresh interval's batches are mixed in a
few large tensor operations; :class:`TopBlockModel` (``features.block`` set; docs/method.md, Top-block mode) mixes the
cached maps at draw time for ``cutmix``/``puzzlemix``, and the block's outputs inside ``step`` for the
feature variants. Both draw the same random numbers in the same order (sampler, then mixing weights, then
the mixing's own draws). Gradients are explicit for the head (d mean CE / d logits = (softmax - target) / B)
and come from autograd for the block; one SGD update (weight decay, momentum, cosine rate) serves both.

The FeatureSet's arrays are wrapped with ``torch.from_numpy`` and never written or copied on the host; on
CUDA they are moved to the device once, in their stored dtype.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import torch

from .block import build_block
from .config import FinetuneConfig
from .errors import ConfigError, DataError
from .featureset import FeatureSet
from .gain import class_centroids
from .mixup import mix, needs_maps, targets
from .sampling import PairSampler

__all__ = ["Batch", "HeadModel", "TopBlockModel", "build_model", "EVAL_CHUNK", "NORM_CHUNK"]

EVAL_CHUNK = 8192  # rows per evaluation chunk (bounds the (chunk, K) logits in memory)
NORM_CHUNK = 1024  # rows per chunk of the feature-norm mean behind lr_scale='feature_norm'
TOP_BLOCK_EVAL_BYTES = 64 * 2**20  # top-block mode: at most this much float32 input map per evaluation chunk


class Batch(NamedTuple):
    """n drawn training samples.

    ``inputs``: (n, d) float32 features, already mixed (head), or (n, C, H, W) float32 maps (top block;
    already mixed for ``cutmix``/``puzzlemix``, the anchors for the feature variants, single instances for
    ``erm``). ``partners`` (n, C, H, W) and ``lam`` (n,): top block with a feature variant only, how the
    block's outputs are mixed; else None. ``target``: (n, K) float32.
    """

    inputs: torch.Tensor
    partners: torch.Tensor | None
    lam: torch.Tensor | None
    target: torch.Tensor

    def split(self, size: int) -> list[Batch]:
        """Consecutive batches of ``size`` samples (views, no copy): one per SGD step."""
        inputs, target = self.inputs.split(size), self.target.split(size)
        none = [None] * len(inputs)
        partners = none if self.partners is None else self.partners.split(size)
        lam = none if self.lam is None else self.lam.split(size)
        return list(map(Batch, inputs, partners, lam, target))


class _Model:
    """The head (weight (K, d), bias (K,)), its momentum buffers, the shared draws and the SGD update."""

    block: torch.nn.Module | None = None

    def __init__(self, features: FeatureSet, config: FinetuneConfig, *, device: torch.device,
                 rng: np.random.Generator, generator: torch.Generator, sampler: PairSampler | None):
        self.config, self.device, self.K = config, device, features.n_classes
        self.rng, self.generator, self.sampler = rng, generator, sampler
        self.uses_maps = config.method != "erm" and needs_maps(config.mixup)  # mixing happens on cached maps
        if self.uses_maps and not features.has_maps:
            raise ConfigError(
                f"mixup {config.mixup!r} needs spatial maps, but this FeatureSet has none; build the features "
                "with keep_maps=True or use mixup='feature'."
            )
        self.train_y = np.asarray(features.train.y, dtype=np.int64)
        unlabeled = features.unlabeled
        self.pool = unlabeled if config.method != "erm" and unlabeled is not None and len(unlabeled) else None
        # The head and its SGD momentum buffers (explicit gradients: no autograd, no torch.optim).
        self.weight = torch.tensor(np.asarray(features.weight), dtype=torch.float32, device=device)  # (K, d)
        self.bias = torch.tensor(np.asarray(features.bias), dtype=torch.float32, device=device)  # (K,)
        self.velocity = {"weight": torch.zeros_like(self.weight), "bias": torch.zeros_like(self.bias)}
        self.version = 0  # bumped by every change of the parameters (cached features are valid for one)
        self._trained: list | None = None  # filled at the first update

    @property
    def has_pool(self) -> bool:
        """True when pairs may take their partner from the unlabeled pool (pseudo-labels are needed)."""
        return self.pool is not None

    # -- drawing --------------------------------------------------------------------------------------

    def draw(self, n: int) -> Batch:
        """n training samples: mixed pairs drawn from the sampler's P, or uniform instances for ``erm``."""
        config = self.config
        if config.method == "erm":
            index = self.rng.integers(0, len(self.train_y), size=n)
            labels = torch.from_numpy(self.train_y[index]).to(self.device)
            inputs = _rows(self._train_inputs, index, self.device).float()
            return Batch(inputs, None, None, torch.nn.functional.one_hot(labels, self.K).float())
        batch = self.sampler.sample(n)
        a = _rows(self._train_inputs, batch.anchor_index, self.device).float()  # (n, d) or (n, C, H, W)
        b = _partners(self._train_inputs, self._pool_inputs, batch.partner_index, batch.partner_from_pool,
                      self.device)
        lam = torch.rand(n, generator=self.generator, device=self.device)
        lam = config.lambda_min + (1.0 - config.lambda_min) * lam  # U(lambda_min, 1)
        return self._mixed(a, b, lam, torch.from_numpy(batch.pairs).to(self.device))

    def _targets(self, pairs: torch.Tensor, lam_eff: torch.Tensor) -> torch.Tensor:
        """(n, K) float32 targets of the pairs (n, 2) with the fraction ``lam_eff`` (n,) of the anchor."""
        return targets(self.config.mixup, pairs[:, 0], pairs[:, 1], lam_eff, self.K).float()

    # -- training -------------------------------------------------------------------------------------

    def _residual(self, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """d(mean cross-entropy)/d(logits) = (softmax(z W^T + b) - target) / B, shape (B, K)."""
        probs = torch.softmax(torch.nn.functional.linear(z, self.weight, self.bias), dim=1)
        return probs.sub_(target).div_(z.shape[0])

    def _update(self, grads: dict[str, torch.Tensor], at: int) -> None:
        """One SGD update (as torch.optim.SGD, dampening 0) of every trained parameter with its gradient;
        the rate follows a cosine from the parameter's rate at step 0 to 0 at ``steps``. Parameters that
        require gradients (the block's) must be updated under ``torch.no_grad()``."""
        config = self.config
        if self._trained is None:  # (name, tensor, rate) of the trained parameters, fixed for the trial
            self._trained = [(n, p, lr) for n, p, lr in self._parameters() if n != "bias" or config.train_bias]
        cosine = 0.5 * (1.0 + math.cos(math.pi * at / config.steps))
        for name, param, lr in self._trained:
            grad = grads[name].add_(param, alpha=config.weight_decay)
            if config.momentum:
                grad = self.velocity[name].mul_(config.momentum).add_(grad)
            param.add_(grad, alpha=-lr * cosine)
        self.version += 1

    def _parameters(self):
        """(name, tensor, rate) of every parameter, in update order."""
        return [("weight", self.weight, self.lr), ("bias", self.bias, self.lr)]

    def is_finite(self) -> bool:
        """False when any parameter is NaN or infinite (a diverged loss made it so)."""
        return math.isfinite(float(self._total()))  # any NaN/inf makes the sum NaN/inf

    def _total(self) -> torch.Tensor:
        return self.weight.sum() + self.bias.sum()

    def describe_rates(self) -> str:
        return f"lr={self.config.lr}, effective lr={self.lr:.3g}"

    # -- state ----------------------------------------------------------------------------------------

    def state(self) -> dict:
        """CPU copies of the head, the momentum buffers and (top block) the block's state_dict."""
        return {
            "weight": self.weight.cpu().clone(),
            "bias": self.bias.cpu().clone(),
            "velocity": {name: v.cpu().clone() for name, v in self.velocity.items()},
            "block_state": None if self.block is None else {
                name: value.detach().cpu().clone() for name, value in self.block.state_dict().items()},
        }

    def load(self, *, weight: torch.Tensor, bias: torch.Tensor, velocity: dict, block_state: dict | None) -> None:
        """Restore :meth:`state`; raises DataError when it was saved for other features."""
        if tuple(weight.shape) != tuple(self.weight.shape):
            raise DataError(
                f"Cannot resume: the state's head has shape {tuple(weight.shape)}, these features need "
                f"{tuple(self.weight.shape)}."
            )
        if (block_state is None) != (self.block is None):
            saved, here = ("a top block", "none") if self.block is None else ("no top block", "one")
            raise DataError(
                f"Cannot resume: the state was saved with {saved}, these features have {here}; resume on the "
                "features (cut) that wrote the state."
            )
        self.weight.copy_(weight)
        self.bias.copy_(bias)
        if self.block is not None:
            self.block.load_state_dict(block_state, strict=True)
        for name, buffer in self.velocity.items():
            buffer.copy_(velocity[name])
        self.version += 1


class HeadModel(_Model):
    """Head-only mode: the linear head on the cached features ``x`` (pooled maps for map mixups)."""

    def __init__(self, features: FeatureSet, config: FinetuneConfig, **kwargs):
        super().__init__(features, config, **kwargs)
        device = self.device
        self.train_x = _tensor(features.train.x, device)
        self.train_maps = _tensor(features.train.maps, device) if self.uses_maps else None
        self._split_x = {"val": _tensor(features.val.x, device), "test": _tensor(features.test.x, device),
                         "pool": None if self.pool is None else _tensor(self.pool.x, device)}
        self._train_inputs = self.train_maps if self.uses_maps else self.train_x
        self._pool_inputs = None
        if self.pool is not None:
            self._pool_inputs = _tensor(self.pool.maps, device) if self.uses_maps else self._split_x["pool"]
        self._val_x, self._val_y = features.val.x, features.val.y
        self._centroids: np.ndarray | None = None
        self.lr = config.lr / _mean_squared_norm(self.train_x) if config.lr_scale == "feature_norm" else config.lr
        per_sample = int(np.prod(self.train_maps.shape[1:])) if self.uses_maps else features.dim
        self.row_bytes = 4 * (self.K + per_sample)  # one drawn, mixed sample and its target
        self.meta: dict = {}

    def features(self, split: str) -> torch.Tensor:
        """(n, d) cached features of ``"val"``, ``"test"`` or ``"pool"``."""
        return self._split_x[split]

    def centroids(self) -> np.ndarray:
        """(K, d) float64 class means of the validation features (fixed: computed once)."""
        if self._centroids is None:
            self._centroids = class_centroids(self._val_x, self._val_y, self.K)
        return self._centroids

    def _mixed(self, a, b, lam, pairs) -> Batch:
        mixed, lam_eff = mix(self.config.mixup, a, b, lam, generator=self.generator)
        z = mixed.mean(dim=(2, 3)) if self.uses_maps else mixed  # head = global pool + linear
        return Batch(z, None, None, self._targets(pairs, lam_eff))

    def step(self, batch: Batch, at: int) -> None:
        """One SGD step of cross-entropy on (B, d) inputs and (B, K) targets at step ``at``.

        A NaN/inf loss makes the head NaN/inf, which the trainer's finiteness check catches.
        """
        z = batch.inputs
        residual = self._residual(z, batch.target)  # (B, K)
        self._update({"weight": residual.T @ z, "bias": residual.sum(dim=0)}, at)


class TopBlockModel(_Model):
    """Top-block mode: a fresh copy of the backbone's last block (``features.block``) and the head.

    The block stays in eval mode (BatchNorm uses the backbone's running statistics, never updated; its
    affine parameters train). The head trains at ``lr`` (relative to the mean squared norm of ``x``), the
    block at ``top_lr`` (relative to that of the flattened training maps) when ``lr_scale="feature_norm"``.
    """

    def __init__(self, features: FeatureSet, config: FinetuneConfig, **kwargs):
        super().__init__(features, config, **kwargs)
        if not features.has_maps:
            raise DataError(
                "This FeatureSet carries a top block but not every split has maps (its input); rebuild the "
                "features with cut='block'."
            )
        device = self.device
        self.block = build_block(features.block).to(device).eval()
        self.train_maps = _tensor(features.train.maps, device)
        self.val_maps, self.test_maps = _tensor(features.val.maps, device), _tensor(features.test.maps, device)
        self.pool_maps = None if self.pool is None else _tensor(self.pool.maps, device)
        self._train_inputs, self._pool_inputs = self.train_maps, self.pool_maps
        self._val_y = features.val.y
        self._val_features: tuple[int, torch.Tensor] | None = None  # (version, (n_val, d))
        self.lr, self.top_lr = config.lr, config.top_lr
        if config.lr_scale == "feature_norm":
            self.lr = config.lr / _mean_squared_norm(_tensor(features.train.x, device))
            self.top_lr = config.top_lr / _mean_squared_norm(self.train_maps)
        self._check_output(features.dim)
        for name, param in self.block.named_parameters():
            self.velocity[f"block.{name}"] = torch.zeros_like(param)
        self.row_bytes = 4 * (self.K + 2 * int(np.prod(self.train_maps.shape[1:])))  # anchor + partner maps
        self.meta = {"cut": "block", "top_lr_effective": self.top_lr}

    def features(self, split: str) -> torch.Tensor:
        """(n, d) outputs of the current block on the cached maps of ``split`` (validation: once per version)."""
        if split != "val":
            return self._block_features({"test": self.test_maps, "pool": self.pool_maps}[split])
        if self._val_features is None or self._val_features[0] != self.version:
            self._val_features = (self.version, self._block_features(self.val_maps))
        return self._val_features[1]

    def centroids(self) -> np.ndarray:
        """(K, d) float64 class means of the current block's validation features (they move with it)."""
        return class_centroids(self.features("val").double().cpu().numpy(), self._val_y, self.K)

    def _mixed(self, a, b, lam, pairs) -> Batch:
        if self.uses_maps:
            mixed, lam_eff = mix(self.config.mixup, a, b, lam, generator=self.generator)
            return Batch(mixed, None, None, self._targets(pairs, lam_eff))
        return Batch(a, b, lam, self._targets(pairs, lam))  # the block's outputs are mixed in step

    def step(self, batch: Batch, at: int) -> None:
        """One SGD step of the head and the block at step ``at``.

        The head's gradient is explicit; the block's comes from autograd, by back-propagating
        d(mean CE)/dz = residual @ W through the block (and the feature mixing).
        """
        B = batch.inputs.shape[0]
        params = dict(self.block.named_parameters())
        with torch.enable_grad():
            if batch.partners is None:
                z = self.block(batch.inputs)  # (B, d)
            else:
                both = self.block(torch.cat([batch.inputs, batch.partners]))  # one pass over the 2 B maps
                z, _ = mix(self.config.mixup, both[:B], both[B:], batch.lam, generator=self.generator)
            residual = self._residual(z.detach(), batch.target)  # (B, K)
            block_grads = torch.autograd.grad(z, list(params.values()), grad_outputs=residual @ self.weight)
        z = z.detach()
        grads = {"weight": residual.T @ z, "bias": residual.sum(dim=0)}
        grads.update({f"block.{name}": g for name, g in zip(params, block_grads)})
        with torch.no_grad():
            self._update(grads, at)

    def _parameters(self):
        return super()._parameters() + [(f"block.{n}", p, self.top_lr) for n, p in self.block.named_parameters()]

    def _total(self) -> torch.Tensor:
        return super()._total() + sum(param.detach().sum() for param in self.block.parameters())

    def describe_rates(self) -> str:
        return f"lr={self.config.lr}, top_lr={self.config.top_lr}, effective lr={self.lr:.3g}"

    def _block_features(self, maps: torch.Tensor) -> torch.Tensor:
        """(n, d) float32 outputs of the current block on (n, C, H, W) maps, by chunks, without gradients."""
        rows = max(1, TOP_BLOCK_EVAL_BYTES // (4 * int(np.prod(maps.shape[1:]))))
        with torch.no_grad():
            parts = [self.block(maps[s:s + rows].to(self.device).float()) for s in range(0, maps.shape[0], rows)]
        return torch.cat(parts)

    def _check_output(self, dim: int) -> None:
        """The block must map a cached map to the head's d features (checked on one training map)."""
        shape = tuple(self._block_features(self.train_maps[:1]).shape)
        if shape != (1, dim):
            raise DataError(
                f"The top block maps a cached map to features of shape {shape[1:]}, but the head expects ({dim},); "
                "the FeatureSet's block payload and its x/weight disagree: rebuild the features with cut='block'."
            )


def build_model(features: FeatureSet, config: FinetuneConfig, **kwargs) -> HeadModel | TopBlockModel:
    """:class:`TopBlockModel` when the FeatureSet carries a block payload, else :class:`HeadModel`.

    ``kwargs``: ``device``, ``rng`` (numpy Generator), ``generator`` (torch Generator) and ``sampler``
    (the trial's PairSampler, None for ``erm``), shared with the trainer.
    """
    return (HeadModel if features.block is None else TopBlockModel)(features, config, **kwargs)


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
