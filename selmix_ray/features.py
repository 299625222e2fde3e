"""Feature extraction: build a long-tailed split, run a frozen backbone once per split, cache the result.

:func:`build_features` resolves and checks its options, asks :mod:`selmix_ray.cache` for an entry with
the same key (everything that determines the arrays, :func:`cache_key_fields`), and otherwise builds the
splits (:mod:`selmix_ray.data`), prepares the backbone (:mod:`selmix_ray.backbones`), extracts features
(and maps), chooses the starting head (:mod:`selmix_ray.head`) and writes the entry.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .backbone_spec import CUTS, CNNSettings, backbone_kind
from .cache import (
    CACHE_FORMAT,
    cache_key,
    default_cache_dir,
    file_sha256,
    load_cached,
    remove_stale_temporaries,
    try_cache_hit,
    write_entry,
)
from .checks import int_problem, number_problem
from .data import DATASET_DEFAULTS, DATASETS, plan_splits, root_identity
from .errors import ConfigError, DataError
from .featureset import FeatureSet, Split
from .head import HEAD_FIT, head_problems, load_head
from .npz import describe_nonfinite

__all__ = [
    "FeatureSet",
    "Split",
    "build_features",
    "backbone_kind",
    "CNNSettings",
    "rebuild_features",
    "cache_key_fields",
    "cache_key",
    "default_cache_dir",
    "load_cached",
    "OPTION_DEFAULTS",
    "CACHE_FORMAT",
    "CUTS",
]

DTYPES = ("float32", "float16")
MAPS_FLOAT16_ABOVE_BYTES = 1 << 30  # maps_dtype="auto": float16 maps when float32 ones would exceed 1 GiB
HEAD_MODES = ("auto", "erm")  # besides a path to a user's head file

# Every option build_features accepts (beyond dataset, rho, backbone, cache_dir, seed), with its default.
OPTION_DEFAULTS: dict[str, Any] = {
    # data and splits
    "root": None,  # folder (CIFAR, imagefolder) or file (npz)
    "download": False,  # CIFAR: let torchvision download into root
    "n_val": None,  # validation samples per class (None: the dataset's default)
    "n_test": None,  # test samples per class (None: the dataset's default)
    "n_max": None,  # labeled size of class 0 (None: the dataset's default)
    "rho_unlabeled": None,  # None: no unlabeled pool; < 1: reversed profile
    "n_max_unlabeled": None,  # None: the largest pool that fits
    # transform and storage
    "image_size": None,  # resize images to image_size x image_size before the backbone
    "normalize": None,  # "imagenet" or "none"; None: "imagenet" for torchvision models, else "none"
    "cut": "penultimate",  # "penultimate": x = the backbone's features; "block": also cache the last block's input
    "keep_maps": False,  # also keep the (n, C, H, W) map at the cut point; x is its global average pool (implied by cut="block")
    "dtype": "float32",  # storage dtype of x (and of maps, see maps_dtype): "float32" or "float16"
    "maps_dtype": "auto",  # "auto": dtype, but float16 when float32 maps would exceed MAPS_FLOAT16_ABOVE_BYTES
    # backbone
    "weights": None,  # torchvision models: local checkpoint file (a state_dict)
    "epochs": 60,  # CNN: training passes over the labeled split (see CNNSettings)
    "lr": 6e-3,  # CNN: Adam learning rate
    "weight_decay": 5e-4,  # CNN: Adam weight decay
    "width": 16,  # CNN: first block's channels (the second has 2 * width)
    "feature_dim": None,  # CNN: channels of the last block = feature dimension d (None: 4 * width)
    "train_batch_size": 64,  # CNN: training batch size
    "augment": True,  # CNN: random shifts while training
    # the starting head (see selmix_ray.head and build_features)
    "head": "auto",  # "auto": the npz's stored head, else the backbone's K-class classifier, else ERM; "erm"; or a .npz file (weight, bias)
    "head_steps": 300,  # ERM head: at least this many minibatch Adam steps
    "head_epochs": 1,  # ERM head: at least this many passes over the train split (its cost at scale; head.py)
    "head_batch_size": 1024,  # ERM head: rows per Adam step (full batch when the train split is smaller)
    "head_lr": 0.01,  # ERM head: Adam learning rate (minibatch fits decay it over their last 30% of steps)
    # execution (not part of the cache key)
    "device": "auto",  # "auto" = CUDA when available
    "batch_size": 256,  # extraction batch size
    "num_threads": "auto",  # torch CPU threads; "auto": 1 for the small CNN and the ERM head fit on CPU, else unchanged
    "progress": True,  # progress bars (tqdm on a terminal, else log lines: progress.bar)
    "verify": False,  # on a cache hit, also check every file's checksum (sizes are always checked)
}
_CNN_OPTIONS = ("epochs", "lr", "weight_decay", "width", "feature_dim", "train_batch_size", "augment")


# -- arguments and the key -----------------------------------------------------------------------


def _jsonable(value, name: str):
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    try:
        json.dumps(value)
    except TypeError as exc:
        raise ConfigError(f"option {name} must be JSON-serialisable (it is saved to rebuild the features), but got {value!r}.") from exc
    return value


def _absolute(path):
    """Paths saved for a later rebuild must not depend on the working directory."""
    return None if path is None else str(Path(path).expanduser().resolve())


def _resolve_options(dataset: str, rho, backbone: str, seed, opts: dict) -> dict:
    """Validate everything at once (one ConfigError listing every problem); return all options."""
    problems = []
    unknown = sorted(set(opts) - set(OPTION_DEFAULTS))
    if unknown:
        problems.append(f"unknown option(s) {', '.join(unknown)}. Available: {', '.join(sorted(OPTION_DEFAULTS))}.")
    if dataset not in DATASETS:
        problems.append(f"Unknown dataset {dataset!r}. Available: {', '.join(DATASETS)}.")
    if rho is None and dataset != "npz":
        problems.append("rho is required (1 = balanced, 100 = the usual long tail); only npz accepts rho=None.")
    elif rho is not None and (not isinstance(rho, (int, float)) or isinstance(rho, bool) or not np.isfinite(rho) or rho < 1):
        problems.append(f"the labeled split needs rho >= 1, but got {rho=}; rho < 1 is for rho_unlabeled only.")
    if not isinstance(backbone, str) or not backbone:
        problems.append(f"backbone must be a non-empty string, but got {backbone!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        problems.append(f"seed must be an integer >= 0, but got {seed=!r}.")
    full = {**OPTION_DEFAULTS, **{k: v for k, v in opts.items() if k in OPTION_DEFAULTS}}
    if full["dtype"] not in DTYPES:
        problems.append(f"dtype must be one of {', '.join(DTYPES)}, but got {full['dtype']!r}.")
    if full["maps_dtype"] not in ("auto", *DTYPES):
        problems.append(f"maps_dtype must be 'auto', 'float32' or 'float16', but got {full['maps_dtype']!r}.")
    if full["cut"] not in CUTS:
        problems.append(f"cut must be one of {', '.join(CUTS)}, but got {full['cut']!r}.")
    elif full["cut"] == "block" and isinstance(backbone, str) and backbone_kind(backbone) == "identity":
        problems.append("cut='block' needs a backbone with a last block (cnn, a ResNet, or a factory's split), not identity.")
    if full["normalize"] not in (None, "imagenet", "none"):
        problems.append(f"normalize must be 'imagenet', 'none' or None, but got {full['normalize']!r}.")
    if isinstance(full["batch_size"], bool) or not isinstance(full["batch_size"], int) or full["batch_size"] < 1:
        problems.append(f"batch_size must be an integer >= 1, but got {full['batch_size']!r}.")
    threads = full["num_threads"]
    if threads != "auto" and threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        problems.append(f"num_threads must be 'auto', None or an integer >= 1, but got {threads!r}.")
    if full["image_size"] is not None and (not isinstance(full["image_size"], int) or full["image_size"] < 1):
        problems.append(f"image_size must be None or an integer >= 1, but got {full['image_size']!r}.")
    if isinstance(backbone, str) and backbone_kind(backbone) == "cnn":
        problems += CNNSettings(**{k: full[k] for k in _CNN_OPTIONS}).check()
    problems += _head_option_problems(full)
    if problems:
        raise ConfigError(problems, where="build_features arguments")
    if full["normalize"] is None:
        full["normalize"] = "imagenet" if backbone_kind(backbone) == "torchvision" else "none"
    if full["cut"] == "block":
        full["keep_maps"] = True  # the block's input maps are what block mode caches
    return full


def _head_option_problems(full: dict) -> list[str]:
    head = full["head"]
    problems = []
    if not isinstance(head, (str, os.PathLike)) or head == "":
        problems.append(f"head must be 'auto', 'erm' or the path of a .npz file with weight (K, d) and bias (K,), "
                        f"but got head={head!r}.")
    elif head not in HEAD_MODES and not Path(head).expanduser().is_file():
        problems.append(f"head file {head} does not exist; head must be 'auto', 'erm' or the path of a .npz file "
                        f"with weight (K, d) and bias (K,).")
    problems += [p for p in (int_problem("head_steps", full["head_steps"], minimum=0),
                             int_problem("head_batch_size", full["head_batch_size"], minimum=1),
                             number_problem("head_epochs", full["head_epochs"], minimum=0),
                             number_problem("head_lr", full["head_lr"], minimum=0)) if p]
    return problems


def _head_key(options: dict) -> dict:
    """The head's part of the cache key: the user file's bytes, or the ERM fit's algorithm and settings."""
    head = options["head"]
    if head not in HEAD_MODES:
        path = Path(head).expanduser()
        return {"mode": "file", "sha256": file_sha256(path) if path.is_file() else f"missing:{path}"}
    return {"mode": head, "fit": HEAD_FIT, "steps": options["head_steps"], "epochs": float(options["head_epochs"]),
            "batch_size": options["head_batch_size"], "lr": float(options["head_lr"])}


def cache_key_fields(dataset: str, *, rho, backbone: str, seed: int, options: dict) -> dict:
    """Everything that determines the cached arrays (docs/architecture.md, Modules), as a JSON-able dict.

    Dataset name and root identity, split sizes (dataset defaults filled in), seed, rho, the unlabeled
    parameters, the backbone spec (name, checkpoint sha256, the CNN's training settings), the cut
    point, keep_maps, the transform, the storage dtypes and the starting head (a user head file's sha256, or
    the ERM fit's algorithm and settings; a head stored in an npz is covered by the file's checksum).
    """
    defaults = DATASET_DEFAULTS.get(dataset, {})
    sizes = {k: options[k] if options[k] is not None else defaults.get(k) for k in ("n_val", "n_test", "n_max")}
    kind = backbone_kind(backbone)
    spec: dict[str, Any] = {"name": backbone, "kind": kind}
    if kind == "cnn":
        spec["training"] = {k: options[k] for k in _CNN_OPTIONS}
    if kind == "torchvision" and options["weights"] is not None:
        weights = Path(options["weights"]).expanduser()
        spec["checkpoint_sha256"] = file_sha256(weights) if weights.is_file() else f"missing:{weights}"
    return {
        "format": CACHE_FORMAT,
        "dataset": dataset,
        "root": root_identity(dataset, options["root"]),
        "splits": {
            **sizes,
            "rho_unlabeled": None if options["rho_unlabeled"] is None else float(options["rho_unlabeled"]),
            "n_max_unlabeled": options["n_max_unlabeled"],
        },
        "seed": int(seed),
        "rho": None if rho is None else float(rho),  # 10 and 10.0 are one key
        "backbone": spec,
        "cut": options["cut"],
        "keep_maps": bool(options["keep_maps"]),
        "transform": {"image_size": options["image_size"], "normalize": options["normalize"]},
        "dtype": options["dtype"],
        "maps_dtype": options["maps_dtype"],
        "head": _head_key(options),
    }


# -- building ------------------------------------------------------------------------------------


def build_features(
    dataset: str,
    *,
    rho: float | None,
    backbone: str = "cnn",
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    **opts,
) -> FeatureSet:
    """Frozen-backbone features of a long-tailed dataset, built once and cached on disk.

    Args:
        dataset: ``digits``, ``mnist``, ``cifar10``, ``cifar100``, ``imagefolder`` or ``npz``.
        rho: labeled imbalance ratio (>= 1; 1 = balanced). ``npz`` also takes None (train as given).
        backbone: ``"cnn"`` (trained here), ``"identity"`` (flattened pixels), a torchvision model name
            (with ``weights=<checkpoint>``) or ``"package.module:function"``.
        cache_dir: where entries live; default :func:`default_cache_dir`.
        seed: splits, CNN training and the ERM head.
        **opts: see :data:`OPTION_DEFAULTS` (root, n_val, n_test, n_max, rho_unlabeled,
            n_max_unlabeled, cut, keep_maps, dtype, maps_dtype, weights, device, batch_size, progress,
            epochs, ...).

    ``cut="block"`` (docs/method.md, Top-block mode): each split's ``maps`` (n, C, H, W) is the map
    *entering* the backbone's last block (the CNN's ``block3``, a ResNet's ``layer4``, the ``block`` a
    factory returns in ``{"trunk", "block", "head"}``); ``x`` (n, d) is still the penultimate feature, the
    global pool of that block's output computed once with its initial weights, so head-only code works
    unchanged; ``FeatureSet.block`` is ``{"kind", "state_dict": {name: ndarray}, "config"}``, the block's
    initial weights, and ``selmix_ray.backbones.build_block(features.block)`` rebuilds the trainable block
    (maps (B, C, H, W) -> features (B, d)). Maps are float16 when float32 ones would exceed
    :data:`MAPS_FLOAT16_ABOVE_BYTES` (``maps_dtype="auto"``).

    The starting head (``FeatureSet.weight`` (K, d), ``bias`` (K,)), which every trial and baseline starts
    from, is chosen by ``head``:

    - ``"auto"`` (default): a head stored in the npz file itself (arrays ``weight`` and ``bias`` beside
      ``x_train``...), else the backbone's own classifier when it has K outputs (the CNN's ``fc``, a
      torchvision model's last ``Linear``, a factory's head), else an ERM head fitted on the cached training
      features (:func:`selmix_ray.head.fit_erm_head`: minibatch Adam, ``head_steps``, ``head_epochs``,
      ``head_batch_size``, ``head_lr``; a progress bar when ``progress``);
    - ``"erm"``: always the fitted ERM head;
    - a path to a ``.npz`` file holding ``weight`` (K, d) and optionally ``bias`` (K,) (zeros when
      absent), e.g. ``np.savez("head.npz", weight=W, bias=b)``: your own classifier, for any backbone.

    A head from a file is checked (shape (K, d) against these features, every value finite) before
    anything is cached, and its bytes are part of the cache key. ``metadata["head_source"]`` says which
    head was used: ``"user"`` (head file), ``"npz"`` (stored in the data file), ``"backbone"`` or ``"erm"``.

    Nothing invalid is cached: an npz file is validated when read (:func:`selmix_ray.npz.npz_problems`),
    and the built features (after any backbone and the storage dtype, e.g. float16 overflow) must be finite.

    Returns:
        A read-only FeatureSet whose arrays are memory-mapped views of the cache entry.
        ``metadata["build_args"]`` holds (dataset, rho, backbone, seed, opts) for :func:`rebuild_features`;
        ``metadata["cache_hit"]`` says whether this call read an existing entry.
    """
    options = _resolve_options(dataset, rho, backbone, seed, opts)
    build_args = {"dataset": dataset, "rho": rho, "backbone": backbone, "seed": int(seed), "opts": _stored_opts(opts)}
    fields = cache_key_fields(dataset, rho=rho, backbone=backbone, seed=seed, options=options)
    key = cache_key(fields)
    root_dir = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser().resolve()
    build_args["cache_dir"] = str(root_dir)
    entry = root_dir / key

    cached = try_cache_hit(entry, verify=options["verify"])
    if cached is not None:
        return cached
    remove_stale_temporaries(entry)
    built = _build(dataset, rho=rho, backbone=backbone, seed=int(seed), options=options)
    metadata = {**built.metadata, "build_args": build_args, "dataset": dataset, "rho": rho, "backbone": backbone,
                "seed": int(seed), "dtype": options["dtype"], "keep_maps": bool(options["keep_maps"]),
                "cut": options["cut"], "key_fields": fields}
    built = FeatureSet(**{**_fields_of(built), "key": key, "metadata": metadata})
    started = time.perf_counter()
    write_entry(entry, built)
    features = load_cached(entry)
    features.metadata["cache_hit"] = False
    features.metadata["timings"]["write_s"] = time.perf_counter() - started
    return features


def _stored_opts(opts: dict) -> dict:
    """The options as the build arguments keep them: JSON values, file paths absolute, no ``progress``."""
    return {k: _jsonable(_absolute(v) if k in ("root", "weights") or (k == "head" and v not in HEAD_MODES) else v, k)
            for k, v in opts.items() if k != "progress"}


def rebuild_features(build_args: dict, *, cache_dir: str | os.PathLike | None = None, **overrides) -> FeatureSet:
    """Call :func:`build_features` again from a FeatureSet's ``metadata["build_args"]``.

    ``cache_dir`` defaults to the one the features were built in when that folder still exists (so a
    resume on the same machine is a cache hit), else to :func:`default_cache_dir`.
    """
    opts = {**build_args.get("opts", {}), **overrides}
    if cache_dir is None and build_args.get("cache_dir") and Path(build_args["cache_dir"]).is_dir():
        cache_dir = build_args["cache_dir"]
    return build_features(
        build_args["dataset"], rho=build_args["rho"], backbone=build_args.get("backbone", "cnn"),
        seed=build_args.get("seed", 0), cache_dir=cache_dir, **opts,
    )


def _fields_of(features: FeatureSet) -> dict:
    names = ("train", "val", "test", "unlabeled", "unlabeled_true_y", "n_classes", "class_names", "weight",
             "bias", "key", "metadata", "block")
    return {name: getattr(features, name) for name in names}


def _build(dataset: str, *, rho, backbone: str, seed: int, options: dict) -> FeatureSet:
    """Cold path: read the data, split, prepare the backbone, extract every split, fit the head."""
    from .device import resolve_device, torch_threads

    device = resolve_device(options["device"])
    threads = options["num_threads"]
    if threads == "auto":
        threads = 1 if device.type == "cpu" and backbone_kind(backbone) == "cnn" else None
    with torch_threads(threads):
        return _build_with(dataset, rho=rho, backbone=backbone, seed=seed, options=options, device=device)


def _build_with(dataset: str, *, rho, backbone: str, seed: int, options: dict, device) -> FeatureSet:
    from .data import load_dataset

    timings: dict[str, float] = {}
    started = time.perf_counter()
    raw = load_dataset(dataset, root=options["root"], image_size=options["image_size"] if dataset == "imagefolder" else None,
                       download=options["download"])
    plan = plan_splits(
        raw, rho=rho, seed=seed, n_val=options["n_val"], n_test=options["n_test"], n_max=options["n_max"],
        rho_unlabeled=options["rho_unlabeled"], n_max_unlabeled=options["n_max_unlabeled"],
    )
    K = raw.n_classes
    timings["load_s"] = time.perf_counter() - started  # includes raw.timings (read_s, validate_s) for npz
    timings.update(raw.timings)
    dtype = np.dtype(options["dtype"])
    precomputed = raw.kind == "features"

    def load(source):
        return raw.pools[source.pool].load(source.indices)

    backbone_info: dict[str, Any] = {"kind": "precomputed"} if precomputed else {}
    if precomputed and options["keep_maps"]:
        what = "cut='block'" if options["cut"] == "block" else "keep_maps=True"
        raise DataError(f"{what} needs images; this npz file holds (n, d) features.")
    prepared, transform = None, None
    if not precomputed:
        transform = _make_transform(options)
        started = time.perf_counter()
        prepared = _prepare(backbone, raw, plan, options, transform=transform, device=device, seed=seed)
        timings["backbone_s"] = time.perf_counter() - started
        backbone_info = prepared.info

    started = time.perf_counter()
    outputs: dict[str, Split | None] = {}
    n_images = 0
    n_total = sum(len(source.indices) for source in plan.splits.values() if source is not None)

    def maps_dtype_for(values_per_image: int) -> np.dtype:
        if options["maps_dtype"] != "auto":
            return np.dtype(options["maps_dtype"])
        return np.dtype("float16") if 4 * values_per_image * n_total > MAPS_FLOAT16_ABOVE_BYTES else dtype
    for name, source in plan.splits.items():
        if source is None:
            outputs[name] = None
            continue
        if precomputed:
            with np.errstate(over="ignore"):  # float16 overflow becomes inf, refused below with its row
                x, maps = load(source).astype(dtype, copy=False), None
        else:
            x, maps = _extract(prepared, raw.pools[source.pool], source.indices, transform, options, device, dtype,
                               maps_dtype_for, name)
            n_images += len(source.indices)
        y = source.labels if name != "unlabeled" else np.full(len(source.indices), -1, np.int64)
        outputs[name] = Split(x=x, y=y.astype(np.int64), maps=maps)
    timings["extract_s"] = time.perf_counter() - started
    timings["images_per_s"] = n_images / timings["extract_s"] if n_images and timings["extract_s"] > 0 else None

    started = time.perf_counter()
    _check_finite(outputs, backbone=backbone, precomputed=precomputed)
    timings["check_s"] = time.perf_counter() - started

    weight, bias, head_source = _starting_head(options, raw, prepared, outputs, K=K, seed=seed, device=device,
                                               timings=timings)

    unlabeled_true_y = None
    if plan.splits.get("unlabeled") is not None and np.all(plan.splits["unlabeled"].labels >= 0):
        unlabeled_true_y = plan.splits["unlabeled"].labels.astype(np.int64)  # else unknown (npz without y)
    metadata = _build_metadata(options, plan, outputs, head_source=head_source, backbone_info=backbone_info,
                               n_images=n_images, timings=timings, K=K)
    return FeatureSet(
        train=outputs["train"], val=outputs["val"], test=outputs["test"], unlabeled=outputs["unlabeled"],
        unlabeled_true_y=unlabeled_true_y, n_classes=K, class_names=raw.class_names,
        weight=np.ascontiguousarray(weight, np.float32), bias=np.ascontiguousarray(bias, np.float32),
        metadata=metadata, block=prepared.block if prepared is not None else None,
    )


def _prepare(backbone, raw, plan, options, *, transform, device, seed):
    """The prepared backbone (trained here for the CNN, on the labeled split's images)."""
    from .backbones import prepare_backbone

    train = plan.splits["train"]
    sample = raw.pools[train.pool].load(train.indices[:1])
    return prepare_backbone(
        backbone, n_classes=raw.n_classes, in_channels=sample.shape[1], keep_maps=bool(options["keep_maps"]),
        device=device, seed=seed, cut=options["cut"], weights=options["weights"],
        cnn=CNNSettings(**{k: options[k] for k in _CNN_OPTIONS}),
        train_images=lambda: (raw.pools[train.pool].load(train.indices), train.labels),
        transform=transform, progress=options["progress"],
    )


def _build_metadata(options, plan, outputs, *, head_source, backbone_info, n_images, timings, K) -> dict:
    return {
        "head_source": head_source,
        **({"head_file": _absolute(options["head"])} if head_source == "user" else {}),
        "backbone_info": backbone_info,
        "feature_dim": int(outputs["train"].x.shape[1]),
        "split_sizes": {k: (None if v is None else len(v)) for k, v in outputs.items()},
        "train_counts": np.bincount(outputs["train"].y, minlength=K).tolist(),
        "sizes": {k: (int(v) if v is not None else None) for k, v in plan.sizes.items()},
        "images_extracted": n_images,
        "timings": timings,
    }


def _check_finite(outputs: dict[str, Split | None], *, backbone, precomputed: bool) -> None:
    """Refuse (DataError, nothing cached) built features or maps holding NaN or inf, naming the split, the
    first bad row and the likely cause (the backbone, or float16 overflow)."""
    problems = []
    overflow = "float16 storage ends at +-65504: use dtype='float32'"
    for name, split in outputs.items():
        for what, array in (("features", None if split is None else split.x), ("maps", None if split is None else split.maps)):
            if array is None:
                continue
            if precomputed:  # the npz was checked finite when read: only the storage dtype can add inf
                cause = f"the values overflow ({overflow})"
            else:
                cause = f"the backbone {backbone!r} produced them" + (
                    f", or they overflow ({overflow})" if array.dtype == np.float16 else "")
            bad = describe_nonfinite(array, f"the {name} split's {what}", fix=cause)
            if bad:
                problems.append(bad)
    if problems:
        raise DataError(" ".join(problems) + " Nothing was cached.")


def _starting_head(options, raw, prepared, outputs, *, K: int, seed: int, device, timings: dict):
    """(weight (K, d), bias (K,), head_source) as chosen by ``options["head"]`` (see build_features), checked."""
    head = options["head"]
    d = int(outputs["train"].x.shape[1])
    if head not in HEAD_MODES:
        weight, bias = load_head(head)
        source, where = "user", f"head file {head}"
    elif head == "auto" and raw.head is not None:
        (weight, bias), source, where = raw.head, "npz", "the npz's stored head"
    elif head == "auto" and prepared is not None and prepared.head is not None:
        (weight, bias), source, where = prepared.head, "backbone", "the backbone's classifier"
    else:
        from .head import fit_erm_head

        started = time.perf_counter()
        weight, bias = fit_erm_head(
            outputs["train"].x, outputs["train"].y, n_classes=K, steps=options["head_steps"],
            epochs=options["head_epochs"], batch_size=options["head_batch_size"], lr=options["head_lr"], seed=seed,
            device=device, progress=options["progress"],
            num_threads=1 if options["num_threads"] == "auto" else options["num_threads"],  # see selmix_ray.head
        )
        timings["head_s"] = time.perf_counter() - started
        source, where = "erm", "the fitted ERM head (diverged?)"
    problems = head_problems(np.asarray(weight), np.asarray(bias), n_classes=K, dim=d, where=where)
    if problems:
        raise DataError(" ".join(problems) + " Nothing was cached.")
    return weight, bias, source


def _make_transform(options: dict):
    """(m, C, H, W) float32 in [0, 1] -> what the backbone sees (resize, then normalisation)."""
    import torch

    from .backbone_spec import IMAGENET_MEAN, IMAGENET_STD

    size, normalize = options["image_size"], options["normalize"]

    def transform(images: torch.Tensor) -> torch.Tensor:
        if size is not None and tuple(images.shape[-2:]) != (size, size):
            images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        if normalize == "imagenet":  # an RGB ImageNet-style model: grayscale is repeated to RGB first
            if images.shape[1] == 1:
                images = images.expand(-1, 3, -1, -1)
            mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device)[:, None, None]
            std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device)[:, None, None]
            images = (images - mean) / std
        return images

    return transform


def _extract(prepared, pool, indices, transform, options, device, dtype, maps_dtype_for, name):
    """Run the frozen backbone over ``indices`` in batches; returns (x (n, d), maps (n, C, H, W) | None).

    ``maps_dtype_for(values per image)`` gives the storage dtype of the maps.
    """
    import torch

    from .progress import bar as progress_bar

    batch_size = options["batch_size"]
    xs, maps_parts = [], []
    starts = range(0, len(indices), batch_size)
    with torch.inference_mode():
        for start in progress_bar(starts, desc=f"extracting {name}", enabled=options["progress"], unit="batch"):
            batch = torch.from_numpy(np.ascontiguousarray(pool.load(indices[start:start + batch_size]), np.float32))
            x, maps = prepared.extract(transform(batch.to(device)))
            xs.append(x.float().cpu().numpy().astype(dtype))
            if maps is not None:
                maps_parts.append(maps.float().cpu().numpy().astype(maps_dtype_for(maps[0].numel())))
    if not xs:
        raise DataError(f"The {name} split is empty; check n_val/n_test/n_max.")
    maps = np.concatenate(maps_parts) if maps_parts else None
    return np.concatenate(xs), maps
