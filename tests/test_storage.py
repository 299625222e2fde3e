"""Experiment folders on a local path and on a pyarrow URI (file://), and the Optuna journal's home."""

from __future__ import annotations

import json
import os

import pytest

from selmix_ray.constants import JOURNAL_FILE
from selmix_ray.errors import ExperimentError
from selmix_ray.storage import Location, json_bytes, local_journal


@pytest.mark.parametrize("uri", [False, True], ids=["path", "file-uri"])
def test_location_reads_writes_lists_and_removes_the_same_way(tmp_path, uri):
    storage = f"file://{tmp_path}" if uri else str(tmp_path)
    location = Location(storage, "exp")
    assert location.is_uri is uri and location.local_path == str(tmp_path / "exp")
    assert location.path == (f"file://{tmp_path}/exp" if uri else str(tmp_path / "exp"))
    assert not location.exists("")
    location.check_writable()  # creates the folder, leaves no probe behind
    assert location.exists("") and os.listdir(tmp_path / "exp") == []

    location.write_bytes("a.json", json_bytes({"x": 1}))
    (tmp_path / "exp" / "trial_1").mkdir()  # what Tune writes
    (tmp_path / "exp" / "trial_1" / "params.json").write_text("{}")
    assert json.loads((tmp_path / "exp" / "a.json").read_text()) == {"x": 1}
    assert location.read_bytes("trial_1/params.json") == b"{}"
    assert location.listdir() == ["a.json", "trial_1"]
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path / "exp"))
    location.remove_dir("trial_1")
    location.remove_file("a.json")
    assert location.listdir() == [] and not location.exists("a.json")

    again = Location.of_experiment(location.path + "/")
    assert (again.storage, again.name, again.path) == (location.storage, "exp", location.path)


def test_a_relative_storage_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    location = Location("runs", "exp")
    assert location.path == str(tmp_path / "runs" / "exp")
    assert Location.of_experiment("runs/exp").path == location.path


def test_unwritable_storage_says_why_and_what_to_pass(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ExperimentError, match=r"Cannot write to storage .*Pass a writable folder or URI"):
        Location(blocker / "runs", "exp").check_writable()


def test_uri_journal_lives_on_the_driver_and_restore_takes_the_longer_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    local = Location(tmp_path / "runs", "exp")
    assert local_journal(local) == tmp_path / "runs" / "exp" / JOURNAL_FILE

    remote = Location(f"file://{tmp_path}/bucket", "exp")
    journal = local_journal(remote)
    assert journal.parent.parent == tmp_path / "cache" / "selmix-ray" / "journals"
    assert local_journal(Location(f"file://{tmp_path}/bucket", "other")) != journal  # one file per experiment
    journal.write_bytes(b"12345")
    remote.write_bytes(JOURNAL_FILE, b"123")  # an older, shorter copy in the experiment: kept local
    assert local_journal(remote, restore=True).read_bytes() == b"12345"
    remote.write_bytes(JOURNAL_FILE, b"1234567")  # a newer (longer) one, e.g. from another driver
    assert local_journal(remote, restore=True).read_bytes() == b"1234567"
