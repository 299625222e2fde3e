"""What went wrong, read from a trial's files: Tune's error file and a damaged ``result.json``.

Decisions:

- A sweep in which every trial errored is a failure (``search``/``resume`` raise
  :class:`~selmix_ray.errors.SweepFailedError`, the CLI exits 1): its message carries the first trial's
  own error, the last exception of Tune's ``error.txt`` (the text file; ``error.pkl`` is never read), not
  Ray's traceback. The experiment is kept. A sweep with at least one trial that did not error is not a
  failure (errored trials show as ``errored`` in the tables).
- A trial that Tune's snapshot lists as ERROR but whose folder has no ``params.json`` (it failed as it
  started, e.g. on a node that died) is still a row of ``Run.df``, ``errored``, its ``problem`` saying so:
  an errored trial is never left out of the tables.
- ``result.json`` is damaged when a complete line (one that ends in a newline) is not JSON, or when no
  line of a non-empty file is: its trial keeps its row (score empty) and the row's ``problem`` names the
  file; the ``selmix_ray`` logger warns once per file read. A last line without its newline is one being
  written, and is skipped silently.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from .errors import SweepFailedError

__all__ = ["read_last_result", "trial_error_message", "raise_if_every_trial_failed", "unlisted_errored_rows"]

logger = logging.getLogger("selmix_ray")  # progress.logger, without importing progress (listed above)
ERROR_FILE = "error.txt"  # Tune's text copy of a trial's last error
# The line that starts the final exception of a Python traceback, e.g. "selmix_ray.errors.TrainingError: ..."
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Fault|Interrupt)\b.*$")


def read_last_result(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the last complete JSON record of ``folder/result.json`` or None, a problem sentence or None)."""
    path = folder / "result.json"
    if not path.is_file():
        return None, None
    complete, partial = _last_lines(path)
    if complete is not None:
        try:
            record = json.loads(complete)
        except ValueError:
            return None, _damaged(path, "its last complete line is not JSON")
        return (record, None) if isinstance(record, dict) else (None, _damaged(path, "its last line is not a "
                                                                                     "JSON object"))
    if not partial.strip() or partial.startswith(b"{"):
        return None, None  # empty, or the first line being written
    return None, _damaged(path, "it holds no JSON line")


def _last_lines(path: Path, chunk: int = 1 << 16) -> tuple[bytes | None, bytes]:
    """(the last non-empty newline-terminated line or None, the bytes after the last newline)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        while True:
            start = max(0, size - chunk)
            f.seek(start)
            pieces = f.read(size - start).split(b"\n")
            partial, lines = pieces[-1], pieces[:-1] if start == 0 else pieces[1:-1]
            for line in reversed(lines):
                if line.strip():
                    return line, partial
            if start == 0:
                return None, partial
            chunk *= 4


def _damaged(path: Path, why: str) -> str:
    problem = (f"{path} is damaged ({why}): the trial is listed without its results; restore the file or "
               "resume the experiment to rerun the trial from its checkpoint")
    logger.warning(problem)
    return problem


def trial_error_message(folder: Path) -> str | None:
    """The trial's own error (its final exception, as 'Type: message'), from Tune's error.txt; None if none."""
    path = folder / ERROR_FILE
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    lines = text.rstrip().splitlines()
    for index in range(len(lines) - 1, -1, -1):
        if _EXCEPTION_LINE.match(lines[index]) and not lines[index].startswith(("ray.", "During ")):
            message = "\n".join(lines[index:]).strip()
            return re.sub(r"^(?:[A-Za-z_]\w*\.)+(?=\w+:)", "", message)  # selmix_ray.errors.X: -> X:
    return lines[-1].strip() if lines else None


def unlisted_errored_rows(path: Path, tune_states: dict, listed) -> list[tuple[dict[str, Any], Path | None]]:
    """(row, folder or None) for each trial that ``tune_states`` (Tune's snapshot) lists as ERROR and that
    is not among ``listed`` (the trial ids read from folders with a params.json)."""
    rows = []
    for trial_id, state in tune_states.items():
        if trial_id in listed or state.status != "ERROR":
            continue
        folder = path / state.relative_logdir if state.relative_logdir else None
        folder = folder if folder is not None and folder.is_dir() else None
        message = trial_error_message(folder) if folder is not None else None
        problem = (f"Tune lists trial {trial_id} as errored, but it has no params.json (it failed as it started)"
                   + (f": {message.splitlines()[-1]}" if message else ""))
        rows.append(({"trial_id": trial_id, "status": "errored", "num_failures": state.num_failures,
                      "start_time": folder.stat().st_mtime if folder is not None else float("nan"),
                      "problem": problem}, folder))
    return rows


def raise_if_every_trial_failed(run) -> None:
    """SweepFailedError when ``run`` has trials and every one of them errored (the first one's error in it)."""
    df = run.df
    if len(df) == 0 or not (df["status"] == "errored").all():
        return
    first = df.sort_values("start_time").iloc[0]["trial_id"] if "start_time" in df else df.iloc[0]["trial_id"]
    folder = run.trial_dirs.get(first)
    message = (trial_error_message(folder) if folder else None) or "(no error file was written)"
    where = f"; the full traceback is in {os.path.join(folder, ERROR_FILE)}" if folder else ""
    raise SweepFailedError(
        f"Every trial of {run.path} errored ({len(df)} of {len(df)}). The first trial's error ({first}):\n"
        f"  {message}\nFix the cause and start a new sweep (the experiment is kept{where}).")
