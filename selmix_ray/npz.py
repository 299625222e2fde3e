"""Reading and validating an ``.npz`` file of precomputed features (or images) per split.

An npz file is validated when it is read, before anything is split, fitted or cached, and every problem is
reported in one DataError (:func:`npz_problems`): real-valued finite features (the split and first bad
row/column named), integer labels (floats refused, not truncated), labels in range (the label and split
named), no empty split, the same feature shape in every split. Decided here: the number of classes K is
``len(class_names)`` when the file names its classes, else ``max(y_train) + 1``, so a validation or test
label that the training split does not know is an error naming it, not a missing class.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .errors import DataError

__all__ = ["NPZ_SPLITS", "NPZ_HEAD", "read_npz", "npz_problems", "first_nonfinite", "describe_nonfinite"]

NPZ_SPLITS = ("train", "val", "test")
NPZ_HEAD = ("weight", "bias")  # an optional trained head stored beside the features (see selmix_ray.head)
FINITE_CHUNK_ROWS = 1 << 16  # rows per chunk of the finiteness scan (bounds its temporary memory)


def first_nonfinite(x: np.ndarray) -> tuple[int, tuple[int, ...]] | None:
    """(count, index of the first NaN/inf) of a float array, scanned by row chunks; None when all finite.

    ``index`` is the full index of the first bad value (row first). Integer arrays are always finite.
    """
    if x.dtype.kind not in "fc":
        return None
    count, first = 0, None
    for start in range(0, len(x), FINITE_CHUNK_ROWS):
        bad = ~np.isfinite(x[start:start + FINITE_CHUNK_ROWS])
        if bad.any():
            count += int(bad.sum())
            if first is None:
                where = np.unravel_index(int(np.argmax(bad.reshape(-1))), bad.shape)
                first = (start + int(where[0]), *map(int, where[1:]))
    return None if first is None else (count, first)


def describe_nonfinite(x: np.ndarray, name: str, *, fix: str = "every feature must be finite") -> str | None:
    """A sentence naming the array, the count, the first bad row/column and ``fix``; None when all finite."""
    found = first_nonfinite(x)
    if found is None:
        return None
    count, first = found
    place = f"row {first[0]}" + (f", column {first[1]}" if len(first) == 2 else f", position {first[1:]}")
    return f"{name} has {count} non-finite value(s) (NaN or inf), the first ({x[first]}) at {place}; {fix}."


_KIND_WORDS = {"b": "booleans", "f": "floats", "c": "complex numbers", "U": "strings", "S": "bytes",
               "O": "Python objects", "V": "raw records", "M": "dates", "m": "time deltas"}


def _read_npz_arrays(path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """Every array of the file that selmix-ray reads, and the problems of those it cannot read."""
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if not magic.startswith((b"PK", b"\x93NUMPY")):  # zip (npz) or npy: anything else is not numpy's
        raise DataError(f"npz file {path} is not an .npz archive (it does not start like a zip file: {magic!r}); "
                        f"save the arrays with np.savez.")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"npz file {path} cannot be read as an .npz archive ({exc}); save it with np.savez.") from exc
    if not hasattr(archive, "files"):  # a plain .npy file
        raise DataError(f"{path} is a single .npy array, not an .npz archive of x_/y_ arrays; save it with np.savez.")
    arrays, problems = {}, []
    wanted = {f"{a}_{s}" for s in (*NPZ_SPLITS, "unlabeled") for a in ("x", "y")} | {"class_names", *NPZ_HEAD}
    with archive:
        for key in archive.files:
            if key not in wanted:
                continue
            try:
                arrays[key] = np.asarray(archive[key])
            except ValueError:  # an object array under allow_pickle=False
                problems.append(
                    f"{key} holds Python objects (dtype object), which are never unpickled; store numbers "
                    f"(x_ as floats, y_ as integers) and class_names as strings."
                )
    return arrays, problems


def npz_problems(arrays: dict[str, np.ndarray]) -> tuple[list[str], int | None]:
    """Every problem of an npz's arrays at once, and the number of classes K (None when unknown).

    Rules: x_<split> holds real numbers, (n, d) features or (n, C, H, W) images, with n >= 1, every value
    finite, the same trailing shape in every split; y_<split> holds integers (floats are refused, not
    truncated; booleans and strings too) of shape (n,). K is ``len(class_names)`` when the file has
    class names, else ``max(y_train) + 1``; every label of train/val/test lies in [0, K) (y_unlabeled,
    the pool's true labels, may also use -1 for "unknown"), and every class has train and val samples.
    A stored head (``weight`` (K, d), ``bias`` (K,)) is checked by :func:`selmix_ray.head.head_problems`.
    """
    splits = [s for s in (*NPZ_SPLITS, "unlabeled") if f"x_{s}" in arrays]
    problems, shapes = _feature_problems(arrays, splits)
    more, labels = _label_problems(arrays, splits)
    problems += more
    more, K = _class_problems(arrays, labels)
    problems += more
    return problems + _stored_head_problems(arrays, shapes, K), K


def _feature_problems(arrays, splits) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """x_<split>: real numbers, (n, d) or (n, C, H, W), n >= 1, finite, one trailing shape; and the shapes."""
    problems: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    for split in splits:
        name, x = f"x_{split}", arrays[f"x_{split}"]
        if x.dtype.kind not in "iuf":
            problems.append(f"{name} must hold real numbers (features or images), but holds "
                            f"{_KIND_WORDS.get(x.dtype.kind, x.dtype)} (dtype {x.dtype}).")
            continue
        if x.ndim not in (2, 4):
            problems.append(f"{name} must be (n, d) features or (n, C, H, W) images, but got shape {x.shape}.")
            continue
        if len(x) == 0:
            fix = "remove x_unlabeled or give it rows" if split == "unlabeled" else "every split needs samples"
            problems.append(f"{name} has no rows; {fix}.")
        elif 0 in x.shape[1:]:
            problems.append(f"{name} has shape {x.shape}: rows without values.")
        else:
            shapes[split] = x.shape[1:]
            bad = describe_nonfinite(x, name)
            if bad:
                problems.append(bad)
    if len({len(shape) for shape in shapes.values()}) > 1:
        problems.append(f"npz splits mix features and images ({', '.join(f'x_{s} {(None,) + shapes[s]}' for s in shapes)}); "
                        f"use one kind.")
    elif len(set(shapes.values())) > 1:
        reference = "train" if "train" in shapes else next(iter(shapes))
        for split, shape in shapes.items():
            if shape != shapes[reference]:
                problems.append(f"x_{split} has rows of shape {shape}, but x_{reference} has {shapes[reference]}; "
                                f"every split needs the same feature dimension.")

    return problems, shapes


def _label_problems(arrays, splits) -> tuple[list[str], dict[str, np.ndarray]]:
    """y_<split>: integers of shape (n,); and the valid ones as int64."""
    problems: list[str] = []
    labels: dict[str, np.ndarray] = {}
    for split in splits:
        key = f"y_{split}"
        if key not in arrays:
            continue
        y, n = arrays[key], len(arrays[f"x_{split}"])
        if y.dtype.kind not in "iu":
            kind = _KIND_WORDS.get(y.dtype.kind, str(y.dtype))
            fix = {"f": "labels are refused, not truncated: convert them with y.astype(int) once you know they are whole",
                   "U": "map the names to integers 0..K-1 and store the names as class_names",
                   "S": "map the names to integers 0..K-1 and store the names as class_names"}.get(
                       y.dtype.kind, "store integer class indices 0..K-1")
            problems.append(f"{key} must hold integer class indices, but holds {kind} (dtype {y.dtype}); {fix}.")
        elif y.shape != (n,):
            problems.append(f"{key} must have shape ({n},), one label per row of x_{split}, but got {y.shape}.")
        else:
            labels[split] = y.astype(np.int64, copy=False)

    return problems, labels


def _class_problems(arrays, labels) -> tuple[list[str], int | None]:
    """K from class_names or y_train; every label in range; every class in train and val."""
    problems: list[str] = []
    K = None
    if "class_names" in arrays:
        names = arrays["class_names"]
        if names.ndim != 1 or names.dtype.kind not in "USiu":
            problems.append(f"class_names must be a 1-D array of strings, but got dtype {names.dtype}, shape {names.shape}.")
        else:
            K = len(names)
    elif "train" in labels and len(labels["train"]):
        K = int(labels["train"].max()) + 1
    if K is not None:
        source = f"the {K} class_names" if "class_names" in arrays else f"the classes 0..{K - 1} of y_train"
        for split, y in labels.items():
            low = -1 if split == "unlabeled" else 0
            outside = np.flatnonzero((y < low) | (y >= K))
            if outside.size:
                row = int(outside[0])
                problems.append(f"y_{split} has {outside.size} label(s) outside {source}, the first {int(y[row])} at "
                                f"row {row}; labels must be integers in [{low}, {K}).")
            elif split in ("train", "val"):
                absent = np.flatnonzero(np.bincount(y, minlength=K) == 0)
                if absent.size:
                    problems.append(f"y_{split} has no sample of class {', '.join(map(str, absent[:10]))}"
                                    f"{' ...' if absent.size > 10 else ''} (of {K}); every class needs train and "
                                    f"validation samples.")
        if K < 2:
            problems.append(f"the data has {K} class; a classifier needs at least 2.")

    return problems, K


def _stored_head_problems(arrays, shapes, K) -> list[str]:
    """A head stored in the file (weight (K, d), optional bias (K,))."""
    problems: list[str] = []
    if "bias" in arrays and "weight" not in arrays:
        problems.append("the file has a bias array but no weight; a stored head needs weight (K, d) (bias optional).")
    if "weight" in arrays:
        from .head import head_problems

        weight = arrays["weight"]
        bias = arrays.get("bias", np.zeros(weight.shape[:1], np.float32))
        dims = {shape[0] for shape in shapes.values() if len(shape) == 1}
        dim = dims.pop() if len(dims) == 1 else None  # images: d is known after the backbone runs
        problems += head_problems(weight, bias, n_classes=K, dim=dim, where="the npz's stored head")
    return problems




def read_npz(root) -> tuple[dict[str, np.ndarray], int, dict[str, float]]:
    """Read and validate an npz file: (its arrays, the number of classes K, {read_s, validate_s}).

    Raises one DataError listing every problem (:func:`npz_problems`).
    """
    if root is None:
        raise DataError("npz needs root=<file.npz> holding x_train, y_train, x_val, y_val, x_test, y_test.")
    path = Path(root).expanduser()
    if not path.is_file():
        raise DataError(f"npz file {path} does not exist.")
    started = time.perf_counter()
    arrays, problems = _read_npz_arrays(path)
    read_s = time.perf_counter() - started
    missing = [f"{a}_{s}" for s in NPZ_SPLITS for a in ("x", "y") if f"{a}_{s}" not in arrays]
    missing = [key for key in missing if not any(key in p for p in problems)]  # unreadable ones are named already
    if missing:
        problems.insert(0, f"it lacks {', '.join(missing)}; it needs x_/y_ arrays for train, val, test")
    started = time.perf_counter()
    more, K = npz_problems(arrays)
    problems += more
    validate_s = time.perf_counter() - started
    if problems:
        if len(problems) == 1:
            raise DataError(f"npz file {path} is not valid: {problems[0]}")
        listing = "\n".join(f"  - {p}" for p in problems)
        raise DataError(f"npz file {path} is not valid ({len(problems)} problems):\n{listing}")
    return arrays, K, {"read_s": read_s, "validate_s": validate_s}
