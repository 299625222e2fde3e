"""Frozen backbones: what turns images into features (docs/architecture.md, Modules; docs/method.md, Data).

Four kinds, chosen by a spec string:

- ``"cnn"``: :class:`SmallCNN`, trained here with ERM on the long-tailed labeled split (seeded), then
  frozen; its ``fc`` becomes the initial head.
- ``"identity"``: flattened pixels (for tests); no head.
- a torchvision model name (``"resnet18"``): built with ``weights=None`` and loaded from a local
  checkpoint file; missing/unexpected keys are reported. Its last ``Linear`` becomes the initial head
  when it has K outputs, and is replaced by ``Identity`` so the model returns penultimate features.
- ``"package.module:function"``: a user factory called as ``function(n_classes=K, in_channels=C)``
  returning an ``nn.Module`` (images -> (n, d) features or (n, C', H', W') maps), a pair
  ``(module, head)`` with ``head`` an ``nn.Linear(d, K)``, or a dict ``{"trunk": module, "block": module,
  "head": nn.Linear | None}`` that names its own split (images -> trunk -> block -> features; needed for
  ``cut="block"``).

Top-block mode (``cut="block"``, docs/method.md, Top-block mode): the cache holds the map entering the backbone's last
block (the CNN's ``trunk`` output, a ResNet's ``layer4`` input, a factory's ``trunk`` output), and the
FeatureSet carries that block's initial weights as a payload of numpy arrays (``block.block_payload``);
the engine turns it back into a trainable ``block.TopBlock`` with ``block.build_block``. The names
(``CUTS``, ``CNNSettings``, ``backbone_kind``) live in the torch-free ``backbone_spec``; the device
resolver in ``device``.

torch and torchvision are imported here at module level: this module is only imported when features
are built.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backbone_spec import CUTS, IMAGENET_MEAN, IMAGENET_STD, CNNSettings, backbone_kind
from .block import TopBlock, block_payload, build_block, call_factory, cnn_stage
from .errors import DataError

__all__ = [
    "SmallCNN",
    "PreparedBackbone",
    "prepare_backbone",
    "train_cnn",
    # re-exported for callers of the backbone layer: backbone_spec (torch-free) and block (shared with the engine)
    "CNNSettings",
    "backbone_kind",
    "CUTS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TopBlock",
    "block_payload",
    "build_block",
    "cnn_stage",
]

# -- the in-process CNN --------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """Three conv stages, global average pool, linear head.

    Shapes: images (n, C, H, W) -> ``trunk`` (n, 2·width, H/4, W/4) -> ``maps`` (n, d, H/4, W/4)
    -> pooled features (n, d) -> logits (n, K), with d = ``feature_dim`` (default 4·width).
    ``block3`` is the "last block" of top-block mode (``cut="block"``): the cache then holds the trunk's
    output, the map entering it.
    """

    def __init__(self, in_channels: int, n_classes: int, *, width: int = 16, feature_dim: int | None = None):
        super().__init__()
        d = feature_dim or 4 * width
        self.block1 = cnn_stage(in_channels, width, pool=True)
        self.block2 = cnn_stage(width, 2 * width, pool=True)
        self.block3 = cnn_stage(2 * width, d, pool=False)
        self.fc = nn.Linear(d, n_classes)

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) images -> (n, 2·width, H/4, W/4), the map entering the last block."""
        return self.block2(self.block1(images))

    def maps(self, images: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) images -> (n, d, H/4, W/4), the last block's output."""
        return self.block3(self.trunk(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.maps(images).mean(dim=(2, 3)))


def train_cnn(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    n_classes: int,
    settings: CNNSettings,
    seed: int,
    device: torch.device,
    progress: bool = False,
    transform: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> SmallCNN:
    """Train :class:`SmallCNN` with plain cross-entropy (ERM) on (n, C, H, W) images; returns it frozen.

    Seeded through a forked RNG, so the caller's global torch RNG is left untouched.
    """
    from .progress import bar as progress_bar

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = SmallCNN(images.shape[1], n_classes, width=settings.width, feature_dim=settings.feature_dim).to(device)
        x_all = transform(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(device))
        y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
        n = len(y_all)
        steps_per_epoch = max(1, -(-n // settings.train_batch_size))
        optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.epochs * steps_per_epoch)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        bar = progress_bar(range(settings.epochs), desc="training CNN backbone", enabled=progress, unit="epoch")
        for _ in bar:
            order = torch.randperm(n, generator=generator).to(device)
            total = 0.0
            for start in range(0, n, settings.train_batch_size):
                idx = order[start:start + settings.train_batch_size]
                batch = _random_shift(x_all[idx], generator) if settings.augment else x_all[idx]
                loss = nn.functional.cross_entropy(model(batch), y_all[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += loss.item() * len(idx)
            bar.set_postfix(loss=f"{total / n:.3f}")
        _recalibrate_batchnorm(model, x_all, settings.train_batch_size)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _random_shift(images: torch.Tensor, generator: torch.Generator, fraction: float = 0.125) -> torch.Tensor:
    """Translate each (C, H, W) image by a random offset of up to ``fraction`` of its side (zero fill)."""
    n = images.shape[0]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = (torch.rand(n, 2, generator=generator) * 2 - 1) * 2 * fraction  # grid units: side = 2
    theta = theta.to(images)
    grid = nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    return nn.functional.grid_sample(images, grid, padding_mode="zeros", align_corners=False)


def _recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int) -> None:
    """Set every BatchNorm's running statistics to their exact average over ``images`` (one pass).

    After a few epochs the exponential running averages still lag the trained weights; the frozen
    backbone extracts features in eval mode, so it should use statistics of its final weights.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size])
    for norm in norms:
        norm.momentum = 0.1


# -- preparing any backbone ----------------------------------------------------------------------


@dataclass
class PreparedBackbone:
    """A frozen backbone ready for extraction.

    Attributes:
        extract: (m, C, H, W) float32 tensor on ``device`` -> (x (m, d), maps (m, C', H', W') or None).
        head: (weight (K, d), bias (K,)) float32 when the backbone's own classifier has K classes.
        info: JSON-able facts (kind, loaded/missing/unexpected checkpoint keys, ...).
        block: with ``cut="block"``, the last block's :func:`block_payload`; ``extract`` then returns
            maps = the block's input and x = the global pool of its output.
    """

    extract: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
    head: tuple[np.ndarray, np.ndarray] | None = None
    info: dict = field(default_factory=dict)
    block: dict | None = None


def _linear_head(linear: nn.Linear) -> tuple[np.ndarray, np.ndarray]:
    weight = linear.weight.detach().cpu().numpy().astype(np.float32)
    bias = linear.bias.detach().cpu().numpy().astype(np.float32) if linear.bias is not None else np.zeros(
        linear.out_features, np.float32
    )
    return weight, bias


def _from_output(out: torch.Tensor, keep_maps: bool, spec: str):
    if out.ndim == 4:
        return out.mean(dim=(2, 3)), (out if keep_maps else None)
    if out.ndim == 2:
        if keep_maps:
            raise DataError(f"keep_maps=True needs spatial maps, but backbone {spec!r} returns (n, d) features.")
        return out, None
    raise DataError(f"Backbone {spec!r} returned shape {tuple(out.shape)}; expected (n, d) or (n, C, H, W).")


def _load_checkpoint(path) -> dict:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"Checkpoint file {path} does not exist; pass weights=<path to a state_dict file>.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for unreadable files
        raise DataError(f"Cannot read checkpoint {path}: {exc}") from exc
    for wrapper in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"Checkpoint {path} is not a state_dict (a dict of name -> tensor).")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = (name, module)
    if found is None:
        raise DataError(f"{type(model).__name__} has no nn.Linear classifier to cut off.")
    return found


def _replace_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _torchvision_backbone(spec, *, weights, n_classes, keep_maps, cut, device) -> PreparedBackbone:
    from torchvision import models

    available = models.list_models()
    if spec not in available:
        raise DataError(
            f"Unknown backbone {spec!r}. Available: 'cnn', 'identity', 'package.module:function', "
            f"or a torchvision model name such as {', '.join(n for n in ('resnet18', 'resnet50', 'mobilenet_v3_small') if n in available)}."
        )
    if weights is None:
        raise DataError(
            f"Backbone {spec!r} needs weights=<local checkpoint file> (a state_dict); no pretrained "
            f"weights can be downloaded here."
        )
    state = _load_checkpoint(weights)
    model = models.get_model(spec, weights=None)
    head_name, linear = _last_linear(model)
    ckpt_classes = state.get(f"{head_name}.weight", linear.weight).shape[0]
    if ckpt_classes != linear.out_features:
        model = models.get_model(spec, weights=None, num_classes=int(ckpt_classes))
        head_name, linear = _last_linear(model)
    result = model.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if len(missing) == len(model.state_dict()):
        raise DataError(f"Checkpoint {weights} shares no parameter name with torchvision {spec!r}; is it for another model?")
    if missing or unexpected:
        warnings.warn(
            f"Loading {weights} into {spec!r}: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}.",
            stacklevel=3,
        )
    head = _linear_head(linear) if linear.out_features == n_classes else None
    head_in_features = linear.in_features
    _replace_module(model, head_name, nn.Identity())
    model.eval().to(device)
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    in_channels = first_conv.in_channels if first_conv is not None else 3

    captured: dict[str, torch.Tensor] = {}
    payload = None
    if cut == "block":
        top = getattr(model, "layer4", None)
        if not isinstance(top, nn.Module):
            raise DataError(
                f"cut='block' on a torchvision model caches the input of its `layer4` (ResNet family); {spec!r} "
                f"has none. Use a factory returning {{'trunk', 'block', 'head'}} instead."
            )
        payload = block_payload("torchvision", top, {"model": spec, "num_classes": int(ckpt_classes), "attribute": "layer4"})
        top.register_forward_pre_hook(lambda _m, inputs: captured.__setitem__("maps", inputs[0]))
    elif keep_maps:
        pool = getattr(model, "avgpool", None)
        if not isinstance(pool, nn.Module):
            raise DataError(f"keep_maps=True needs a model with an `avgpool` module; {spec!r} has none.")
        pool.register_forward_hook(lambda _m, inputs, _out: captured.__setitem__("maps", inputs[0]))

    def extract(images):
        if images.shape[1] == 1 and in_channels == 3:
            images = images.expand(-1, 3, -1, -1)
        x = model(images).flatten(1)  # the pooled output of layer4 when cut="block"
        maps = captured.pop("maps", None)
        if maps is not None and cut == "penultimate":
            if maps.shape[1] != head_in_features:
                raise DataError(
                    f"keep_maps=True needs the classifier right after avgpool (as in ResNets), but {spec!r} "
                    f"pools {maps.shape[1]} channels and its classifier takes {head_in_features} features."
                )
            x = maps.mean(dim=(2, 3))
        return x, maps

    info = {
        "kind": "torchvision",
        "checkpoint": str(weights),
        "checkpoint_classes": int(ckpt_classes),
        "missing_keys": missing,
        "unexpected_keys": unexpected,
    }
    return PreparedBackbone(extract, head, info, payload)


def _factory_backbone(spec, *, n_classes, in_channels, keep_maps, cut, device) -> PreparedBackbone:
    parts = call_factory(spec, n_classes=n_classes, in_channels=in_channels)
    head = _linear_head(parts["head"]) if parts["head"] is not None else None
    trunk, block = parts["trunk"].eval().to(device), parts["block"]
    if cut == "block":
        if block is None:
            raise DataError(
                f"cut='block' needs factory {spec!r} to name its split: return {{'trunk': module, 'block': "
                f"module, 'head': nn.Linear or None}} (images -> trunk -> block -> features)."
            )
        payload = block_payload("factory", block, {"factory": spec, "n_classes": n_classes, "in_channels": in_channels})
        block.eval().to(device)

        def extract(images):
            maps = trunk(images)
            if maps.ndim != 4:
                raise DataError(f"cut='block' needs the trunk of {spec!r} to return (n, C, H, W) maps, got {tuple(maps.shape)}.")
            return _from_output(block(maps), False, spec)[0], maps

        return PreparedBackbone(extract, head, {"kind": "factory"}, payload)
    module = trunk if block is None else nn.Sequential(trunk, block.eval().to(device))
    return PreparedBackbone(lambda images: _from_output(module(images), keep_maps, spec), head, {"kind": "factory"})


def prepare_backbone(
    spec: str,
    *,
    n_classes: int,
    in_channels: int,
    keep_maps: bool,
    device: torch.device,
    seed: int,
    cut: str = "penultimate",
    weights=None,
    cnn: CNNSettings | None = None,
    train_images: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    progress: bool = False,
) -> PreparedBackbone:
    """Build (and for ``"cnn"``, train) the frozen backbone named by ``spec``.

    ``train_images()`` returns the labeled split's (n, C, H, W) images and (n,) labels; only the CNN
    calls it. ``cut="block"`` (one of :data:`CUTS`) makes ``extract`` return the map entering the last
    block as ``maps`` and fills ``PreparedBackbone.block``; ``keep_maps`` then has no further effect.
    """
    if cut not in CUTS:
        raise DataError(f"cut must be one of {', '.join(CUTS)}, but got {cut=!r}.")
    kind = backbone_kind(spec)
    if kind == "identity":
        if keep_maps or cut == "block":
            what = "cut='block'" if cut == "block" else "keep_maps=True"
            raise DataError(f"{what} needs a backbone with spatial maps; use backbone='cnn'.")
        return PreparedBackbone(lambda images: (images.flatten(1), None), None, {"kind": "identity"})
    if kind == "cnn":
        images, labels = train_images()
        model = train_cnn(
            images, labels, n_classes=n_classes, settings=cnn or CNNSettings(), seed=seed, device=device,
            progress=progress, transform=transform,
        )
        with torch.no_grad():
            accuracy = float((model(transform(torch.from_numpy(images).to(device))).argmax(1).cpu().numpy() == labels).mean())
        info = {"kind": "cnn", "train_accuracy": accuracy}
        if cut == "block":
            conv = model.block3[0]
            config = {"in_channels": conv.in_channels, "out_channels": conv.out_channels, "pool": False}

            def extract_block_input(batch):
                maps = model.trunk(batch)
                return model.block3(maps).mean(dim=(2, 3)), maps

            return PreparedBackbone(extract_block_input, _linear_head(model.fc), info, block_payload("cnn", model.block3, config))

        def extract(batch):
            maps = model.maps(batch)
            return maps.mean(dim=(2, 3)), (maps if keep_maps else None)

        return PreparedBackbone(extract, _linear_head(model.fc), info)
    if kind == "factory":
        return _factory_backbone(spec, n_classes=n_classes, in_channels=in_channels, keep_maps=keep_maps, cut=cut,
                                 device=device)
    return _torchvision_backbone(spec, weights=weights, n_classes=n_classes, keep_maps=keep_maps, cut=cut, device=device)
