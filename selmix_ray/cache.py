"""The on-disk feature cache: one folder of uncompressed Arrow IPC files per key.

The features that :func:`selmix_ray.features.build_features` computes are stored as uncompressed
Arrow IPC files in ``cache_dir/<key>/``, where ``key`` hashes everything that determines the arrays
(:func:`selmix_ray.features.cache_key_fields`). A later call with the same inputs memory-maps those files: no image is read
and no backbone runs, and the returned arrays are zero-copy, read-only numpy views of the map.

An entry is written to a temporary folder and renamed into place; its ``manifest.json`` (file sizes and
checksums) is written last. An entry without a manifest, with a file of the wrong size, or (with
``verify=True``) a wrong checksum is treated as absent and rebuilt.

Decided here: **content checksums are xxh3-128** (:func:`file_digest`, the ``xxhash`` package), for the
cache's own files and for an npz data file, whose bytes are part of every call's cache key
(:func:`selmix_ray.data.root_identity`), so every load, cached or not, reads the whole file. The key must
stay content-based (a file's size, mtime and inode do not change when it is rewritten in place within the
same second, or copied with its times kept). sha256 (OpenSSL, SHA-NI) ran at about 1 GB/s here, already
half the speed of reading a cached file, and on a 2-core machine shared with other jobs neither threads
(sha256 of 16 MiB blocks in 2 threads: 0.63 s vs 0.64 s for 616 MB, other jobs holding the second core)
nor blake2b (0.4 GB/s) nor crc32 (1.7 GB/s, and only 32 bits) did better. xxh3-128 hashed the same file in
0.11 s against 0.58 s (reading alone 0.08 s): a 128-bit non-cryptographic hash, whose accidental
collision needs about 2^64 distinct files; a deliberately forged collision is not a threat to a user's own
cache folder. Compatibility: a new manifest names ``xxh3_128`` per file, an older one ``sha256``, and
``verify=True`` checks each with the hash its manifest names; a key built from an npz now carries
``xxh3_128`` where it carried ``sha256``, so an entry of the former key is simply not found (and rebuilt
under the new key). Smaller files hashed for a key (a user head, a torchvision checkpoint, mnist's csv)
keep sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import numpy as np

from .errors import DataError
from .featureset import FeatureSet, Split

__all__ = ["CACHE_FORMAT", "DIGEST", "default_cache_dir", "cache_key", "file_digest", "file_sha256", "load_cached",
           "write_entry", "try_cache_hit", "remove_stale_temporaries"]

CACHE_FORMAT = 1  # bump when the on-disk layout changes
MANIFEST = "manifest.json"
META = "meta.json"
BLOCK_FILE = "block.npz"  # the top block's initial state_dict (cut="block")
DIGEST = "xxh3_128"  # the name of file_digest's checksum in manifests and keys
READ_BLOCK = 1 << 22  # bytes read at a time when hashing a file


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/selmix-ray``, else ``~/.cache/selmix-ray``."""
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "selmix-ray"


def cache_key(fields: dict) -> str:
    """24 hex digits of the sha256 of the canonical JSON of ``fields``."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes (manifests written before :data:`DIGEST`, small files in keys)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(READ_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """Hex xxh3-128 of a file's bytes: the content checksum of cache files and npz data (module docstring)."""
    import xxhash

    digest = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(READ_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


# -- Arrow IPC files -----------------------------------------------------------------------------


def _write_arrays(path: Path, columns: dict[str, np.ndarray]) -> None:
    """One Arrow IPC file, one record batch: 2-D+ arrays as fixed-size lists of their rows."""
    import pyarrow as pa

    arrays, names, shapes = [], [], {}
    for name, array in columns.items():
        array = np.ascontiguousarray(array)
        shapes[name] = list(array.shape)
        flat = pa.array(array.reshape(-1))
        if array.ndim > 1:
            width = int(np.prod(array.shape[1:]))
            flat = pa.FixedSizeListArray.from_arrays(flat, width)
        arrays.append(flat)
        names.append(name)
    batch = pa.record_batch(arrays, names=names)
    schema = batch.schema.with_metadata({"shapes": json.dumps(shapes)})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(batch.replace_schema_metadata(schema.metadata))


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Memory-map an IPC file written by :func:`_write_arrays`; arrays are read-only zero-copy views."""
    import pyarrow as pa

    reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
    if reader.num_record_batches != 1:
        raise DataError(f"{path} holds {reader.num_record_batches} record batches, expected 1.")
    batch = reader.get_batch(0)
    shapes = json.loads(reader.schema.metadata[b"shapes"])
    out = {}
    for name, shape in shapes.items():
        column = batch.column(name)
        if isinstance(column, pa.FixedSizeListArray):
            column = column.values
        array = column.to_numpy(zero_copy_only=True).reshape(shape)
        array.flags.writeable = False
        out[name] = array
    return out


def _split_columns(split: Split, true_y: np.ndarray | None = None) -> dict[str, np.ndarray]:
    columns = split.to_dict()
    if true_y is not None:
        columns["true_y"] = true_y
    return columns


def write_entry(entry: Path, features: FeatureSet) -> None:
    """Write the entry in a temporary sibling folder, manifest last, then rename it into place."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    try:
        files = {}
        for name in ("train", "val", "test", "unlabeled"):
            split = getattr(features, name)
            if split is not None:
                true_y = features.unlabeled_true_y if name == "unlabeled" else None
                _write_arrays(tmp / f"{name}.arrow", _split_columns(split, true_y))
                files[f"{name}.arrow"] = None
        _write_arrays(tmp / "head.arrow", {"weight": features.weight, "bias": features.bias})
        files["head.arrow"] = None
        meta = {"n_classes": features.n_classes, "class_names": list(features.class_names),
                "key": features.key, "metadata": features.metadata}
        if features.block is not None:
            np.savez(tmp / BLOCK_FILE, **features.block["state_dict"])
            files[BLOCK_FILE] = None
            meta["block"] = {"kind": features.block["kind"], "config": features.block["config"],
                             "names": list(features.block["state_dict"])}
        (tmp / META).write_text(json.dumps(meta, indent=1))
        files[META] = None
        manifest = {
            "format": CACHE_FORMAT,
            "key": features.key,
            "files": {f: {"bytes": (tmp / f).stat().st_size, DIGEST: file_digest(tmp / f)} for f in files},
        }
        with open(tmp / MANIFEST, "w") as handle:  # written last: its presence marks a complete entry
            json.dump(manifest, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / MANIFEST).is_file():  # not a concurrent writer's finished entry
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _check_entry(entry: Path, *, verify: bool) -> str | None:
    """None when the entry is complete, else why it is not."""
    manifest_path = entry / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (interrupted write)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as exc:
        return f"unreadable manifest ({exc})"
    if manifest.get("format") != CACHE_FORMAT:
        return f"cache format {manifest.get('format')} != {CACHE_FORMAT}"
    for name, facts in files.items():
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != facts["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {facts['bytes']}"
        if verify:
            problem = _checksum_problem(path, facts)
            if problem:
                return f"{name} {problem}"
    return None


def _checksum_problem(path: Path, facts: dict) -> str | None:
    """Why ``path`` fails the checksum its manifest entry names (xxh3-128, or sha256 in older manifests)."""
    for name, function in ((DIGEST, file_digest), ("sha256", file_sha256)):
        if name in facts:
            return None if function(path) == facts[name] else f"fails its {name} check (the file changed)"
    return "has no checksum in the manifest"


def load_cached(entry: str | os.PathLike, *, verify: bool = False) -> FeatureSet:
    """Read one cache entry (a ``cache_dir/<key>`` folder) as a read-only, memory-mapped FeatureSet.

    Raises DataError when the entry is incomplete or corrupt.
    """
    entry = Path(entry)
    problem = _check_entry(entry, verify=verify)
    if problem:
        raise DataError(f"Cache entry {entry} is not valid: {problem}. Delete it or build again.")
    try:
        meta = json.loads((entry / META).read_text())
        splits: dict[str, Split | None] = {}
        true_y = None
        for name in ("train", "val", "test", "unlabeled"):
            path = entry / f"{name}.arrow"
            if not path.is_file():
                splits[name] = None
                continue
            arrays = _read_arrays(path)
            splits[name] = Split(x=arrays["x"], y=arrays["y"], maps=arrays.get("maps"))
            true_y = arrays.get("true_y", true_y)
        head = _read_arrays(entry / "head.arrow")
        block = _read_block(entry, meta["block"]) if "block" in meta else None
    except DataError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError/KeyError on damaged files
        raise DataError(f"Cache entry {entry} is not valid: {type(exc).__name__}: {exc}.") from exc
    metadata = dict(meta["metadata"])
    metadata["cache_path"] = str(entry)
    return FeatureSet(
        train=splits["train"], val=splits["val"], test=splits["test"], unlabeled=splits["unlabeled"],
        unlabeled_true_y=true_y, n_classes=int(meta["n_classes"]), class_names=tuple(meta["class_names"]),
        weight=head["weight"], bias=head["bias"], key=meta["key"], metadata=metadata, block=block,
    )


def _read_block(entry: Path, facts: dict) -> dict:
    """The top block's payload ``{"kind", "state_dict": {name: read-only ndarray}, "config"}`` (small: read whole)."""
    with np.load(entry / BLOCK_FILE, allow_pickle=False) as stored:
        state = {name: stored[name] for name in facts["names"]}
    for array in state.values():
        array.flags.writeable = False
    return {"kind": facts["kind"], "state_dict": state, "config": facts["config"]}


def try_cache_hit(entry: Path, *, verify: bool) -> FeatureSet | None:
    """The cached FeatureSet at ``entry``, or None when there is none or it is damaged (then it is moved
    aside and removed, with a warning, so that the caller rebuilds it)."""
    if not entry.exists():
        return None
    try:
        features = load_cached(entry, verify=verify)
    except DataError as exc:
        warnings.warn(f"{exc} Rebuilding it.", stacklevel=3)
        trash = entry.with_name(f".trash-{entry.name}-{uuid.uuid4().hex[:8]}")
        os.rename(entry, trash)
        shutil.rmtree(trash, ignore_errors=True)
        return None
    features.metadata["cache_hit"] = True
    return features


STALE_TEMPORARY_S = 6 * 3600  # a writer's temporary folder older than this belongs to a dead process


def remove_stale_temporaries(entry: Path) -> None:
    """Delete temporary folders of this key left by writers that crashed (older than STALE_TEMPORARY_S)."""
    if not entry.parent.is_dir():
        return
    now = time.time()
    for tmp in entry.parent.glob(f".tmp-{entry.name}-*"):
        try:
            if now - tmp.stat().st_mtime > STALE_TEMPORARY_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass  # another process removed it first


