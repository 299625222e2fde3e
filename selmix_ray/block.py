"""The trainable top block of ``cut="block"`` (docs/method.md, Top-block mode): written by the backbones, read by the engine.

``backbones`` cuts a backbone before its last block and stores that block's initial weights in the
FeatureSet as a payload of plain numpy arrays (:func:`block_payload`); the engine turns the payload back
into a trainable module (:func:`build_block`). Both sides import this module, so the engine never imports
the data layer (``data``, ``features``, ``backbones``).

torch is imported at module level; torchvision only when a torchvision block is rebuilt, and a factory's
module only when a factory block is.
"""

from __future__ import annotations

import importlib

import numpy as np
import torch
from torch import nn

from .errors import DataError

__all__ = ["BLOCK_KINDS", "TopBlock", "block_payload", "build_block", "call_factory", "cnn_stage"]

BLOCK_KINDS = ("cnn", "torchvision", "factory")  # how build_block rebuilds a payload's module


def cnn_stage(c_in: int, c_out: int, *, pool: bool) -> nn.Sequential:
    """One stage of the small CNN: 3x3 conv, BatchNorm, ReLU, then a 2x2 max-pool when ``pool``."""
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))


class TopBlock(nn.Module):
    """The trainable top block of ``cut="block"``: cached map (B, C, H, W) -> features (B, d).

    ``block`` is the backbone's last block; a 4-D output is global-average pooled (as the backbone
    pools before its classifier), a 2-D one is returned as it is.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        out = self.block(maps)
        return out.mean(dim=(2, 3)) if out.ndim == 4 else out.flatten(1)


def block_payload(kind: str, block: nn.Module, config: dict) -> dict:
    """What a FeatureSet carries of the last block: plain numpy and JSON, so it crosses Ray's object store.

    Returns ``{"kind": kind, "state_dict": {name: ndarray}, "config": config}``; ``kind`` and the JSON-able
    ``config`` say how :func:`build_block` rebuilds the module (``"cnn"``: ``in_channels``,
    ``out_channels``, ``pool``; ``"torchvision"``: ``model``, ``num_classes``, ``attribute``;
    ``"factory"``: ``factory``, ``n_classes``, ``in_channels``).
    """
    state = {name: value.detach().cpu().numpy().copy() for name, value in block.state_dict().items()}
    return {"kind": kind, "state_dict": state, "config": dict(config)}


def build_block(payload: dict) -> TopBlock:
    """A fresh :class:`TopBlock` with the payload's weights (FeatureSet.block), in eval mode, on the CPU.

    Maps a cached map (B, C, H, W) to the penultimate features (B, d), pooled; with the initial weights
    it reproduces the FeatureSet's ``x`` from its ``maps``. Every parameter has ``requires_grad=True``;
    BatchNorm running statistics are part of the state. The payload's arrays are copied, never written
    (they may be read-only object-store views). A ``"factory"`` block calls the user's factory again,
    so its module must be importable where the block is built.
    """
    if not isinstance(payload, dict) or not {"kind", "state_dict", "config"} <= set(payload):
        raise DataError(
            "build_block needs a FeatureSet.block payload {'kind', 'state_dict', 'config'}; build the features "
            "with cut='block'."
        )
    kind, config = payload["kind"], payload["config"]
    if kind == "cnn":
        block = cnn_stage(config["in_channels"], config["out_channels"], pool=config["pool"])
    elif kind == "torchvision":
        from torchvision import models

        model = models.get_model(config["model"], weights=None, num_classes=config["num_classes"])
        block = model.get_submodule(config["attribute"])
    elif kind == "factory":
        block = call_factory(config["factory"], n_classes=config["n_classes"], in_channels=config["in_channels"])["block"]
    else:
        raise DataError(f"Unknown block kind {kind!r}. Available: {', '.join(BLOCK_KINDS)}.")
    state = {name: torch.as_tensor(np.array(value)) for name, value in payload["state_dict"].items()}
    block.load_state_dict(state, strict=True)
    return TopBlock(block).eval()


def call_factory(spec: str, *, n_classes: int, in_channels: int) -> dict:
    """Import and call a user factory ``"package.module:function"`` as ``function(n_classes=K,
    in_channels=C)``; returns ``{"trunk": module, "block": module | None, "head": nn.Linear | None}``."""
    module_name, _, func_name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise DataError(f"Cannot import backbone factory {spec!r}: {exc}. Expected 'package.module:function'.") from exc
    made = factory(n_classes=n_classes, in_channels=in_channels)
    if isinstance(made, dict):
        if not {"trunk", "block"} <= set(made) or not set(made) <= {"trunk", "block", "head"}:
            raise DataError(
                f"Factory {spec!r} returned a dict with keys {sorted(made)}; expected 'trunk', 'block' and "
                f"optionally 'head'."
            )
        parts = {"trunk": made["trunk"], "block": made["block"], "head": made.get("head")}
    elif isinstance(made, tuple) and len(made) == 2:
        parts = {"trunk": made[0], "block": None, "head": made[1]}
    else:
        parts = {"trunk": made, "block": None, "head": None}
    for name in ("trunk", "block"):
        if parts[name] is not None and not isinstance(parts[name], nn.Module):
            raise DataError(
                f"Factory {spec!r} must return an nn.Module, (module, head) or {{'trunk', 'block', 'head'}}; "
                f"its {name} is a {type(parts[name]).__name__}."
            )
    head = parts["head"]
    if head is not None and (not isinstance(head, nn.Linear) or head.out_features != n_classes):
        raise DataError(f"Factory {spec!r} returned a head that is not an nn.Linear(d, {n_classes}).")
    return parts
