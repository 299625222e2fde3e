"""One writer per experiment: the lock that ``search`` and ``resume`` hold while they write.

``search`` and ``resume`` take an exclusive lock on the experiment before they write anything and hold it
until they return; a second one refuses at once with :class:`~selmix_ray.errors.ExperimentError` naming
the holder (host, pid, command, start time). Nothing in an experiment is ever deleted without this lock.

How, and what is guaranteed where:

- **Local disk**: ``fcntl.flock`` on the file ``.selmix_lock`` inside the experiment folder. The kernel
  releases the lock when the holder exits, however it exits (SIGKILL included), so no lock is ever stale.
  The file is never deleted (deleting a locked file would let a third process lock a new file of the same
  name); it holds the holder's JSON record while held and is emptied on release.
- **NFS**: Linux clients implement ``flock`` on NFS as a whole-file NFS lock (NLM for NFSv3, the protocol's
  own locks for NFSv4), so drivers on different machines exclude each other, provided the mount has
  locking (not ``nolock`` or ``local_lock=all``). A holder whose machine dies keeps the lock until the
  server's lease/grace period ends (NFSv4: about 90 s).
- **URI storage** (``s3://``, ``gs://``; object stores have no locks): the lock file lives on the driver's
  disk, next to the experiment's local Optuna journal (named by a hash of the experiment's URI). Two
  drivers on the same machine exclude each other; drivers on different machines are NOT excluded, so run
  one driver per URI experiment. A ``file://`` URI is a local path and gets the local lock.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import socket
import sys
from pathlib import Path

from .errors import ExperimentError

__all__ = ["LOCK_FILE", "ExperimentLock", "lock_path"]

LOCK_FILE = ".selmix_lock"


def lock_path(location) -> Path:
    """Where the lock of ``location`` (a :class:`~selmix_ray.storage.Location`) lives (module docstring)."""
    if location.local_path is not None:
        return Path(location.local_path) / LOCK_FILE
    from .features import default_cache_dir

    digest = hashlib.sha256(location.path.encode()).hexdigest()[:16]
    return Path(default_cache_dir()) / "journals" / digest / LOCK_FILE


class ExperimentLock:
    """The exclusive lock on one experiment, as a context manager: ``with ExperimentLock(location, "resume"):``.

    ``action`` ("search", "resume") is part of the refusal message a second writer gets.
    """

    def __init__(self, location, action: str):
        self.location = location
        self.action = action
        self.path = lock_path(location)
        self._handle = None

    def acquire(self) -> ExperimentLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held open while locked)
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _describe(handle.read())
            handle.close()
            raise ExperimentError(
                f"Cannot {self.action} {self.location.path}: another process is writing it ({holder}). Wait "
                "for it to end, or stop it; the lock goes with that process, so there is nothing to clean up."
            ) from None
        except OSError as error:  # e.g. NFS mounted with locking off
            handle.close()
            raise ExperimentError(
                f"Cannot {self.action} {self.location.path}: its lock file {self.path} cannot be locked "
                f"({error.__class__.__name__}: {error}). On NFS, mount with locking (not nolock)."
            ) from error
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(holder_record(self.action)))
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is None:
            return
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.flush()
        fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None

    @property
    def held(self) -> bool:
        return self._handle is not None

    def __enter__(self) -> ExperimentLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder_record(action: str) -> dict:
    """What a lock holder writes into the lock file: host, pid, command, start time (UTC)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "action": action,
            "command": " ".join(sys.argv) or sys.executable,
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _describe(text: str) -> str:
    """The holder named from the lock file's record. A record of a process of this host that no longer runs
    is a killed holder's (a kill skips the emptying on release), read in the moment between the new holder's
    flock and its own write: it names nobody."""
    try:
        record = json.loads(text)
        stale = record["host"] == socket.gethostname() and not _alive(int(record["pid"]))
        if not stale:
            return (f"{record['action']} by pid {record['pid']} on host {record['host']} since "
                    f"{record['since']}, command: {record['command']}")
    except (ValueError, KeyError, TypeError):
        pass
    return "a holder that has not written its name yet"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
