"""The Optuna journal checked before ``resume`` writes anything: damage is refused or, for a torn tail only,
repaired with a backup.

Optuna appends to ``optuna_journal.log`` one JSON record per line, each append a single write of whole
lines. What ``check_journal`` does with each kind of damage (decided here, kept everywhere):

- **A torn tail** (bytes after the last newline: the disk filled, the process died mid-write, a copy was
  cut short mid-line): that write never completed, and Optuna's reader already ignores it, so the study
  Optuna sees is the same without it. The file is copied to ``optuna_journal.log.torn-<UTC time>`` and then
  cut at its last newline; a warning names the backup. Left as it was, the next append would be glued to
  the partial line and make every later record unreadable.
- **A bad line in the middle** (a complete line that is not a JSON record): refused with
  :class:`~selmix_ray.errors.ExperimentError` naming the line and how to repair it (a backup, or keeping
  the lines before it, losing what they recorded later). Nothing is changed.
- **A journal that cannot be this experiment's** (missing, no study of the experiment's name, or fewer
  trials than Tune's snapshot lists: cut short at a line boundary, or replaced by an older copy): refused,
  so that ``resume`` never runs on a study that restores nothing.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path

from .errors import ExperimentError
from .progress import logger
from .tune_adapter import journal_op_codes

__all__ = ["check_journal"]


def check_journal(path: str | os.PathLike, *, study_name: str, tune_trials: int) -> None:
    """Refuse a damaged journal at ``path``, or repair a torn tail (module docstring); returns None when
    the journal holds the study ``study_name`` with at least ``tune_trials`` trials (what Tune's newest
    snapshot lists). Every check runs before the tail is cut: a refused journal is left as it was."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(
            f"Cannot resume: the Optuna journal {path} is missing, but Ray Tune's snapshot lists {tune_trials} "
            "trial(s). Put the experiment's optuna_journal.log back (from a backup or the original folder).")
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    create_study, create_trial = journal_op_codes()
    studies, trials = [], {}
    for number, line in enumerate(complete.splitlines(), start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "op_code" not in record:
                raise ValueError("not a journal record")
        except ValueError:
            total = complete.count(b"\n")
            raise ExperimentError(
                f"Cannot resume: line {number} of {total} of the Optuna journal {path} is damaged (not a JSON "
                f"record: {line[:60]!r}), so Optuna cannot read the {total - number} line(s) after it. Repair: "
                f"put back a good copy of the journal, or keep its first {number - 1} lines (`head -n "
                f"{number - 1} {path} > fixed.log`, then replace it; the trials recorded after line {number} "
                "are lost to the study) and resume again.") from None
        if record["op_code"] == create_study:
            studies.append(record.get("study_name"))
        elif record["op_code"] == create_trial:
            trials[record.get("study_id")] = trials.get(record.get("study_id"), 0) + 1
    if study_name not in studies:
        raise ExperimentError(
            f"Cannot resume: the Optuna journal {path} holds no study named {study_name!r} (it holds "
            f"{studies or 'none'}): it is not this experiment's journal. Put the experiment's own journal back.")
    found = trials.get(studies.index(study_name), 0)
    if found < tune_trials:
        raise ExperimentError(
            f"Cannot resume: the Optuna journal {path} records {found} trial(s), but Ray Tune's snapshot lists "
            f"{tune_trials}: the journal is older than the experiment (cut short, or an older copy). Put back "
            "the complete journal.")
    if len(complete) < len(data):  # only once nothing else is wrong: a refused journal stays as it was
        _cut_torn_tail(path, data, complete)


def _cut_torn_tail(path: Path, data: bytes, complete: bytes) -> None:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    backup = path.with_name(f"{path.name}.torn-{stamp}")
    shutil.copyfile(path, backup)
    with open(path, "r+b") as journal:
        journal.truncate(len(complete))
        journal.flush()
        os.fsync(journal.fileno())
    logger.warning(f"the Optuna journal {path} ended in a torn line ({len(data) - len(complete)} bytes after its last "
         f"newline: a write that never completed, which Optuna ignores); cut it off, the whole file is kept "
         f"as {backup}")
