"""One writer per experiment (selmix_ray.ownership): a second search/resume is refused naming the holder,
the lock dies with its holder (SIGKILL included), and two processes racing for it never both get it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from selmix_ray.errors import ExperimentError
from selmix_ray.manifest import MANIFEST_FORMAT
from selmix_ray.ownership import LOCK_FILE, ExperimentLock
from selmix_ray.storage import Location

HOLD = """
import sys, time
from selmix_ray.ownership import ExperimentLock
from selmix_ray.storage import Location
lock = ExperimentLock(Location.of_experiment(sys.argv[1]), "resume")
try:
    lock.acquire()
except Exception as error:
    print("REFUSED", error, flush=True)
    sys.exit(3)
print("HELD", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _holder(experiment, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLD, str(experiment), str(seconds)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})


def _experiment(tmp_path, manifest: bool = True):
    experiment = tmp_path / "exp"
    experiment.mkdir()
    if manifest:  # enough of a manifest for resume to reach its lock
        (experiment / "selmix_run.json").write_text(json.dumps({"format": MANIFEST_FORMAT, "space": {}}))
    return experiment


def test_resume_of_a_held_experiment_is_refused_naming_the_holder_and_a_killed_holder_frees_it(tmp_path):
    from selmix_ray.sweep import resume

    experiment = _experiment(tmp_path)
    holder = _holder(experiment, 120)
    try:
        assert holder.stdout.readline().strip() == "HELD"
        with pytest.raises(ExperimentError, match=rf"another process is writing it \(resume by pid {holder.pid} "
                                                  r"on host \S+ since .*command: .*Wait for it to end"):
            resume(experiment)
        with pytest.raises(ExperimentError, match=f"pid {holder.pid}"):
            ExperimentLock(Location.of_experiment(experiment), "search").acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    with ExperimentLock(Location.of_experiment(experiment), "resume") as lock:  # no stale lock after SIGKILL
        assert lock.held and json.loads((experiment / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert (experiment / LOCK_FILE).read_text() == ""  # emptied on release, never deleted


def test_two_processes_racing_for_the_lock_never_both_hold_it(tmp_path):
    """20 races of two processes started together: each time exactly one holds, the other names it."""
    experiment = _experiment(tmp_path, manifest=False)
    for _ in range(20):
        racers = [_holder(experiment, 1.5) for _ in range(2)]
        outs = [racer.communicate(timeout=120)[0] for racer in racers]
        held = [racer for racer, out in zip(racers, outs) if out.startswith("HELD")]
        refused = [out for out in outs if out.startswith("REFUSED")]
        assert len(held) == 1 and len(refused) == 1, outs
        assert f"pid {held[0].pid}" in refused[0] or "has not written its name yet" in refused[0]


def test_uri_experiments_lock_on_the_drivers_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    from selmix_ray.ownership import lock_path

    local = Location.of_experiment(f"file://{tmp_path}/exp")
    assert lock_path(local) == tmp_path / "exp" / LOCK_FILE  # file:// is a local path: the local lock
    location = Location.of_experiment(f"file://{tmp_path}/exp")
    location.local_path = None  # what an s3:// or gs:// Location has
    assert str(lock_path(location)).startswith(str(tmp_path / "cache"))
    with ExperimentLock(location, "search"), pytest.raises(ExperimentError, match="another process"):
        ExperimentLock(location, "resume").acquire()  # flock: two open files conflict even in one process


def test_a_killed_holders_record_names_nobody(tmp_path):
    """A holder killed while holding leaves its record (a kill skips the emptying); a process that locks next
    has a moment before it writes its own: a refusal in that moment must not name the dead process."""
    import fcntl
    import socket

    experiment = _experiment(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    record = {"host": socket.gethostname(), "pid": dead_pid, "action": "resume", "command": "old",
              "since": "2026-01-01T00:00:00+00:00"}
    with open(experiment / LOCK_FILE, "a+", encoding="utf-8") as handle:
        handle.write(json.dumps(record))
        handle.flush()
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # the new holder, before its write
        with pytest.raises(ExperimentError, match="has not written its name yet") as refused:
            ExperimentLock(Location.of_experiment(str(experiment)), "resume").acquire()
        assert f"pid {dead_pid}" not in str(refused.value)
        record["pid"] = os.getpid()  # a live holder is named
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(record))
        handle.flush()
        with pytest.raises(ExperimentError, match=f"pid {os.getpid()}"):
            ExperimentLock(Location.of_experiment(str(experiment)), "resume").acquire()
