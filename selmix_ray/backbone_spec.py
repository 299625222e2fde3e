"""What names a frozen backbone and where it is cut: plain data, no torch (docs/architecture.md, Modules; docs/method.md, Top-block mode).

``features`` (the cache key, the option checks) and ``backbones`` (building the model) both read these,
so neither imports the other for them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .checks import int_problem, number_problem

__all__ = ["CUTS", "CNNSettings", "backbone_kind", "IMAGENET_MEAN", "IMAGENET_STD"]

CUTS = ("penultimate", "block")  # where the frozen part ends (docs/method.md, Top-block mode)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # per-channel mean of ImageNet-style normalisation (RGB)
IMAGENET_STD = (0.229, 0.224, 0.225)  # per-channel standard deviation of ImageNet-style normalisation (RGB)


def backbone_kind(spec: str) -> str:
    """``"cnn"``, ``"identity"``, ``"factory"`` (``package.module:function``) or ``"torchvision"``."""
    if spec in ("cnn", "identity"):
        return spec
    if ":" in spec:
        return "factory"
    return "torchvision"


@dataclass(frozen=True)
class CNNSettings:
    """ERM training of the in-process CNN (part of the cache key; the defaults of OPTION_DEFAULTS)."""

    # Passes over the long-tailed labeled split. Measured on mnist rho=100, seeds 100-104, with
    # benchmarks/probe_features.py (test min recall of the backbone's head / after post-hoc class weights
    # fitted on validation; mean of 5 seeds): 20 epochs 0.00 / 0.55, 40: 0.05 / 0.71, 60: 0.37 / 0.81,
    # 80: 0.47 / 0.81; 40 epochs of batch 32: 0.11 / 0.80; width 32 at 20 epochs 0.00 / 0.66. Cold
    # build (training + extraction) of the default, machine loaded by other jobs: 44 s (20 epochs: 23 s).
    epochs: int = 60
    lr: float = 6e-3  # Adam learning rate, cosine-decayed to 0 (at 20 epochs, 2e-3: mean test recall 0.44 vs 0.54, mnist rho=100)
    weight_decay: float = 5e-4  # Adam (L2) weight decay
    width: int = 16  # channels of the first block; the second has 2 * width
    feature_dim: int | None = None  # channels of the last block = feature dimension d (None: 4 * width)
    train_batch_size: int = 64  # SGD batch size while training
    augment: bool = True  # random shifts of up to 1/8 of the image side while training

    def check(self) -> list[str]:
        """Every problem with these settings, one sentence each (empty when valid)."""
        problems = [int_problem(name, getattr(self, name), minimum=1)
                    for name in ("epochs", "width", "train_batch_size")]
        if self.feature_dim is not None and int_problem("feature_dim", self.feature_dim, minimum=1):
            problems.append(f"feature_dim must be None or an integer >= 1, but got feature_dim={self.feature_dim!r}.")
        if not isinstance(self.augment, bool):
            problems.append(f"augment must be True or False, but got augment={self.augment!r}.")
        problems += [number_problem(name, getattr(self, name), minimum=0) for name in ("lr", "weight_decay")]
        return [problem for problem in problems if problem]
