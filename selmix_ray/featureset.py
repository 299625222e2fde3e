"""The FeatureSet container that feature building and fine-tuning share (numpy only; never imports Ray).

A FeatureSet holds the frozen backbone's outputs for every split plus the initial linear head. Arrays
are numpy so that Ray's object store hands every trial a zero-copy, read-only view; trials wrap them
with ``torch.from_numpy`` and never write to them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import DataError

__all__ = ["Split", "FeatureSet"]

_SPLITS = ("train", "val", "test", "unlabeled")


@dataclass(frozen=True)
class Split:
    """One split of cached features.

    Attributes:
        x: (n, d) float32 or float16 penultimate features (with ``keep_maps=True`` the global average pool of
            ``maps``; with ``cut="block"`` the pool of the last block's output at its initial weights).
        y: (n,) int64 labels; -1 for every sample of the unlabeled pool.
        maps: optional (n, C, H, W) spatial maps at the cut point (``keep_maps=True``: the final map;
            ``cut="block"``: the map entering the last block).
    """

    x: np.ndarray
    y: np.ndarray
    maps: np.ndarray | None = None

    def __post_init__(self):
        if self.x.ndim != 2:
            raise DataError(f"Split.x must be 2-D (n, d), but got shape {self.x.shape}.")
        if self.y.shape != (self.x.shape[0],):
            raise DataError(f"Split.y must have shape ({self.x.shape[0]},), but got {self.y.shape}.")
        if self.maps is not None and (self.maps.ndim != 4 or self.maps.shape[0] != self.x.shape[0]):
            raise DataError(
                f"Split.maps must have shape ({self.x.shape[0]}, C, H, W), but got {self.maps.shape}."
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def to_dict(self) -> dict[str, np.ndarray]:
        out = {"x": self.x, "y": self.y}
        if self.maps is not None:
            out["maps"] = self.maps
        return out


@dataclass(frozen=True)
class FeatureSet:
    """Features of every split, the initial head and what identifies them.

    Attributes:
        train, val, test: labeled splits; val and test are class-balanced.
        unlabeled: optional pool (``y`` all -1); its true labels live apart in ``unlabeled_true_y``,
            for evaluation only, and the training loop never reads them.
        n_classes: K.
        class_names: K names.
        weight: (K, d) float32 initial head weight; bias: (K,) float32.
        key: the cache key (hash of everything that determines the arrays).
        metadata: JSON-serialisable build arguments and facts (dataset, rho, backbone, ...).
        block: optional top-block payload (docs/method.md, Top-block mode): ``{"state_dict": {name: ndarray}, ...}``.
    """

    train: Split
    val: Split
    test: Split
    n_classes: int
    weight: np.ndarray
    bias: np.ndarray
    class_names: tuple[str, ...] = ()
    unlabeled: Split | None = None
    unlabeled_true_y: np.ndarray | None = None
    key: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    block: dict[str, Any] | None = None

    def __post_init__(self):
        K = self.n_classes
        problems = []
        if K < 2:
            problems.append(f"n_classes must be >= 2, but got {K}.")
        d = self.train.x.shape[1]
        for name in _SPLITS:
            split = getattr(self, name)
            if split is None:
                continue
            if split.x.shape[1] != d:
                problems.append(f"split {name!r} has feature dimension {split.x.shape[1]}, train has {d}.")
            labels = split.y
            if name == "unlabeled":
                if labels.size and np.any(labels != -1):
                    problems.append("the unlabeled split's y must be all -1; keep true labels in unlabeled_true_y.")
            elif labels.size and (labels.min() < 0 or labels.max() >= K):
                problems.append(f"split {name!r} has labels outside [0, {K}).")
        if self.weight.shape != (K, d):
            problems.append(f"weight must have shape ({K}, {d}), but got {self.weight.shape}.")
        if self.bias.shape != (K,):
            problems.append(f"bias must have shape ({K},), but got {self.bias.shape}.")
        if self.class_names and len(self.class_names) != K:
            problems.append(f"class_names has {len(self.class_names)} names for {K} classes.")
        for name in ("train", "val"):
            missing = np.setdiff1d(np.arange(K), getattr(self, name).y)
            if missing.size:
                problems.append(f"split {name!r} has no sample of class {', '.join(map(str, missing[:10]))}.")
        if problems:
            raise DataError("Inconsistent FeatureSet: " + " ".join(problems))
        if not self.class_names:
            object.__setattr__(self, "class_names", tuple(str(k) for k in range(K)))

    # -- facts -----------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Feature dimension d."""
        return int(self.train.x.shape[1])

    @property
    def train_counts(self) -> np.ndarray:
        """(K,) int64 labeled training count per class (defines head and tail)."""
        return np.bincount(self.train.y, minlength=self.n_classes).astype(np.int64)

    @property
    def has_maps(self) -> bool:
        """True when every split carries spatial maps (needed by cutmix and puzzlemix)."""
        return all(getattr(self, s) is None or getattr(self, s).maps is not None for s in _SPLITS)

    @property
    def nbytes(self) -> int:
        total = self.weight.nbytes + self.bias.nbytes
        for name in _SPLITS:
            split = getattr(self, name)
            if split is not None:
                total += sum(a.nbytes for a in split.to_dict().values())
        return int(total)

    # -- (de)serialisation -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of numpy arrays and metadata (what the object store holds)."""
        out: dict[str, Any] = {
            "n_classes": int(self.n_classes),
            "class_names": list(self.class_names),
            "weight": self.weight,
            "bias": self.bias,
            "key": self.key,
            "metadata": dict(self.metadata),
            "block": self.block,
            "unlabeled_true_y": self.unlabeled_true_y,
        }
        for name in _SPLITS:
            split = getattr(self, name)
            out[name] = None if split is None else split.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, read_only: bool = True) -> FeatureSet:
        """Rebuild from :meth:`to_dict` output without copying arrays; ``read_only`` locks them."""
        def arr(a):
            if a is None:
                return None
            a = np.asarray(a)
            if read_only and a.flags.writeable:
                a = a.view()
                a.flags.writeable = False
            return a

        def split(d):
            if d is None:
                return None
            return Split(x=arr(d["x"]), y=arr(d["y"]), maps=arr(d.get("maps")))

        block = data.get("block")
        return cls(
            train=split(data["train"]),
            val=split(data["val"]),
            test=split(data["test"]),
            unlabeled=split(data.get("unlabeled")),
            unlabeled_true_y=arr(data.get("unlabeled_true_y")),
            n_classes=int(data["n_classes"]),
            class_names=tuple(data.get("class_names") or ()),
            weight=arr(data["weight"]),
            bias=arr(data["bias"]),
            key=data.get("key", ""),
            metadata=dict(data.get("metadata") or {}),
            block=block,
        )

    @classmethod
    def from_object_store(cls, payload) -> FeatureSet:
        """Read-only FeatureSet from the dict a trial receives (``tune.with_parameters``, or ``ray.get``
        of ``ray.put(features.to_dict())``); a FeatureSet is returned as it is.

        Arrays are zero-copy views of the object store's shared memory. This module never imports Ray:
        the caller puts and fetches (``sweep`` puts the features once per sweep).
        """
        if isinstance(payload, FeatureSet):
            return payload
        if not isinstance(payload, dict):
            raise DataError(
                f"Expected the FeatureSet dict fetched from Ray's object store, but got {type(payload).__name__}; "
                "pass ray.get(ref) rather than the ObjectRef."
            )
        return cls.from_dict(payload, read_only=True)
