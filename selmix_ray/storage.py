"""Where an experiment lives: a folder ``<storage>/<name>`` on a local/NFS path or a pyarrow URI.

``Location`` reads, writes, lists and deletes inside that folder the same way whatever the storage is
(``s3://``, ``gs://``, ``file://`` go through ``pyarrow.fs``; a plain path through ``os``). A relative
path is made absolute, so Ray workers started elsewhere find the same folder.

The Optuna journal needs a POSIX file with locks: on local storage it lives in the experiment; with a URI
it lives on the driver's disk (under the cache folder, named by a hash of the experiment's URI) and is
copied into the experiment at each snapshot and at the end (``sweep`` and the snapshot callback do the
copies); :func:`local_journal` with ``restore=True`` brings the copy back for ``resume``.

Decided here: local writes are atomic (temporary file + rename); URI writes are plain stream writes
(object stores replace whole objects anyway).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from .constants import JOURNAL_FILE
from .errors import ExperimentError

__all__ = ["Location", "journal_storage", "local_journal", "json_bytes"]


class Location:
    """An experiment folder ``<storage>/<name>`` on a local path or a pyarrow filesystem URI.

    Attributes:
        name: the experiment name (the folder's base name).
        storage: the absolute storage folder, or the URI without a trailing slash.
        path: ``<storage>/<name>`` (a path or a URI), what the user passes to ``resume``.
        local_path: the folder on this machine's file system (a ``file://`` URI's path too), or None.
        is_uri: True for pyarrow URIs; then ``fs`` is their pyarrow FileSystem (None for a path).
    """

    def __init__(self, storage: str | os.PathLike, name: str):
        storage = os.fspath(storage)
        self.name = name
        self.is_uri = "://" in storage
        if self.is_uri:
            import pyarrow.fs

            self.fs, self.fs_storage = pyarrow.fs.FileSystem.from_uri(storage)
            self.storage = storage.rstrip("/")
            self.path = f"{self.storage}/{name}"
            local = isinstance(self.fs, pyarrow.fs.LocalFileSystem)
            self.local_path = f"{self.fs_storage}/{name}" if local else None
        else:
            self.fs = None
            self.storage = os.path.abspath(os.path.expanduser(storage))
            self.path = os.path.join(self.storage, name)
            self.local_path = self.path

    @classmethod
    def of_experiment(cls, path: str | os.PathLike) -> Location:
        """The Location of an existing experiment folder ``<storage>/<name>`` (a path or a URI)."""
        text = os.fspath(path).rstrip("/")
        if "://" in text:
            storage, _, name = text.rpartition("/")
            return cls(storage, name)
        text = os.path.abspath(os.path.expanduser(text))
        return cls(os.path.dirname(text), os.path.basename(text))

    def _fs_path(self, relative: str) -> str:
        base = f"{self.fs_storage}/{self.name}"
        return f"{base}/{relative}" if relative else base

    def exists(self, relative: str) -> bool:
        """Whether ``relative`` (a file or folder inside the experiment; "" the experiment) exists."""
        if self.fs is None:
            return os.path.exists(os.path.join(self.path, relative) if relative else self.path)
        import pyarrow.fs

        return self.fs.get_file_info(self._fs_path(relative)).type != pyarrow.fs.FileType.NotFound

    def read_bytes(self, relative: str) -> bytes:
        if self.fs is None:
            return Path(self.path, relative).read_bytes()
        with self.fs.open_input_stream(self._fs_path(relative)) as stream:
            return stream.read()

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write a whole file; local writes go through a temporary file and a rename (atomic)."""
        if self.fs is None:
            target = Path(self.path, relative)
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.tmp")
            temporary.write_bytes(data)
            os.replace(temporary, target)
            return
        self.fs.create_dir(self._fs_path(""), recursive=True)
        with self.fs.open_output_stream(self._fs_path(relative)) as stream:
            stream.write(data)

    def listdir(self) -> list[str]:
        """Sorted names directly inside the experiment folder."""
        if self.fs is None:
            return sorted(os.listdir(self.path))
        import pyarrow.fs

        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self._fs_path("")))
        return sorted(info.base_name for info in infos)

    def remove_dir(self, relative: str) -> None:
        """Delete the folder ``relative`` and everything in it (a local one: errors ignored)."""
        if self.fs is None:
            shutil.rmtree(os.path.join(self.path, relative), ignore_errors=True)
        else:
            self.fs.delete_dir(self._fs_path(relative))

    def move_dir(self, relative: str, target: str) -> None:
        """Move the folder ``relative`` to ``target`` (both inside the experiment; ``target`` must not exist,
        its parent is created). A URI's folder is copied, then the original deleted."""
        if self.exists(target):
            raise FileExistsError(f"{self._fs_path(target) if self.fs else os.path.join(self.path, target)} exists")
        if self.fs is None:
            os.makedirs(os.path.dirname(os.path.join(self.path, target)), exist_ok=True)
            os.rename(os.path.join(self.path, relative), os.path.join(self.path, target))
            return
        import pyarrow.fs

        self.fs.create_dir(self._fs_path(target), recursive=True)
        pyarrow.fs.copy_files(self._fs_path(relative), self._fs_path(target), source_filesystem=self.fs,
                              destination_filesystem=self.fs)
        self.fs.delete_dir(self._fs_path(relative))

    def remove_file(self, relative: str) -> None:
        if self.fs is None:
            os.remove(os.path.join(self.path, relative))
        else:
            self.fs.delete_file(self._fs_path(relative))

    def check_writable(self) -> None:
        """Create the experiment folder, or raise ExperimentError saying why it cannot be."""
        probe = ".selmix_write_probe"
        try:
            self.write_bytes(probe, b"ok")
            self.remove_file(probe)
        except OSError as error:
            raise ExperimentError(
                f"Cannot write to storage {self.storage!r} ({error.__class__.__name__}: {error}). Pass a "
                "writable folder or URI as storage=."
            ) from error


def json_bytes(value) -> bytes:
    """``value`` as indented JSON text with a final newline (what the manifest and baselines files hold)."""
    return (json.dumps(value, indent=2, sort_keys=False, default=str) + "\n").encode()


def journal_storage(path: Path):
    """An Optuna JournalStorage on the file ``path`` (its folder is created)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def local_journal(location: Location, *, restore: bool = False) -> Path:
    """The journal file Optuna writes: in the experiment (local storage) or on the driver's disk (URI).

    With ``restore``, a URI experiment's copy replaces the local file when it is longer (the journal only
    grows, so the longer one is the newer).
    """
    if not location.is_uri:
        return Path(location.path) / JOURNAL_FILE
    from .features import default_cache_dir

    digest = hashlib.sha256(location.path.encode()).hexdigest()[:16]
    local = Path(default_cache_dir()) / "journals" / digest / JOURNAL_FILE
    local.parent.mkdir(parents=True, exist_ok=True)
    if restore and location.exists(JOURNAL_FILE):
        stored = location.read_bytes(JOURNAL_FILE)
        if not local.exists() or local.stat().st_size < len(stored):
            local.write_bytes(stored)
    return local
