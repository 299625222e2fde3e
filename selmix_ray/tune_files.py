"""Tune's and Optuna's files in an experiment folder, read without importing Ray or Optuna.

Part of the adapter to their internals (``tune_adapter``, which re-exports every name here; its tests
check these layouts on the installed versions):

- Tune's ``experiment_state-<time>.json`` files: ``{"trial_data": [[trial_json, runtime_json], ...]}``
  with ``trial_id``, ``status`` and ``relative_logdir`` in the trial's JSON and ``num_failures`` in the
  runtime JSON (:func:`parse_experiment_state`, :func:`read_trial_states`, :func:`listed_trial_ids`), and
  the trial's checkpoint manager as a hex ``CLOUDPICKLE_FALLBACK`` blob in the runtime JSON whose bytes
  name the trial's ``checkpoint_XXXXXX`` folders (:func:`snapshot_checkpoints`, which never unpickles it);
- the files of one snapshot, torn or whole (:func:`damaged_snapshot_files`);
- the lines of Optuna's journal file (JSON objects with ``op_code`` 0 create study, 4 create trial, 8 set
  a trial's user attribute; trial ids global, numbers per study, both in creation order), read so that
  ``results`` stays Optuna-free (:func:`read_journal_trial_links`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "EXPERIMENT_STATE_PREFIX",
    "TUNE_TRIAL_ID_ATTR",
    "TuneTrialState",
    "experiment_state_files",
    "parse_experiment_state",
    "read_trial_states",
    "listed_trial_ids",
    "snapshot_checkpoints",
    "damaged_snapshot_files",
    "journal_op_codes",
    "read_journal_trial_links",
]

EXPERIMENT_STATE_PREFIX = "experiment_state-"  # Tune's CKPT_FILE_TMPL "experiment_state-{}.json"
TUNE_TRIAL_ID_ATTR = "tune_trial_id"  # the Optuna user attribute that holds a trial's Tune trial id


@dataclass(frozen=True)
class TuneTrialState:
    """One trial as Tune's experiment snapshot records it.

    Attributes:
        trial_id: Tune's trial id (None when the record has none).
        status: "PENDING", "RUNNING", "PAUSED", "TERMINATED" or "ERROR".
        num_failures: how many times the trial failed (each retried from its last checkpoint).
        relative_logdir: the trial's folder name inside the experiment (None when the record has none).
    """

    trial_id: str | None
    status: str | None
    num_failures: int
    relative_logdir: str | None


def experiment_state_files(names: list[str]) -> list[str]:
    """The experiment snapshot files among ``names``, oldest first (their names sort by time)."""
    return sorted(n for n in names if n.startswith(EXPERIMENT_STATE_PREFIX) and n.endswith(".json"))


def parse_experiment_state(data: str | bytes) -> list[TuneTrialState]:
    """The trials of one experiment snapshot file's text; ValueError when it is not a readable snapshot
    (e.g. half-written). A runtime record that is already a mapping is read as it is."""
    try:
        out = []
        for trial_json, runtime_json in json.loads(data)["trial_data"]:
            trial = json.loads(trial_json)
            runtime = json.loads(runtime_json) if isinstance(runtime_json, (str, bytes)) else runtime_json
            out.append(TuneTrialState(trial_id=trial.get("trial_id"), status=trial.get("status"),
                                      num_failures=runtime.get("num_failures", 0),
                                      relative_logdir=trial.get("relative_logdir")))
        return out
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"not a Tune experiment snapshot: {error!r}") from None


def read_trial_states(folder: str | os.PathLike) -> dict[str, TuneTrialState]:
    """{trial_id: state} from the newest readable snapshot in the local experiment ``folder`` (a running
    sweep rewrites them, so a newer one may be half-written); {} when there is none."""
    folder = Path(folder)
    for name in reversed(experiment_state_files(os.listdir(folder))):
        try:
            trials = parse_experiment_state((folder / name).read_bytes())
            if any(trial.trial_id is None for trial in trials):
                raise ValueError("a trial without trial_id")
            return {trial.trial_id: trial for trial in trials}
        except (OSError, ValueError):
            continue
    return {}


def listed_trial_ids(names: list[str], read) -> set[str] | None:
    """Trial ids of the newest experiment snapshot among ``names`` (the greatest name: the one
    ``Tuner.restore`` restores from); ``read(name)`` -> bytes. None when there is none, or it cannot be read
    (e.g. an upload rewriting it) or names a trial without an id."""
    files = experiment_state_files(names)
    if not files:
        return None
    try:
        ids = {trial.trial_id for trial in parse_experiment_state(read(files[-1]))}
    except (OSError, ValueError):
        return None
    return None if None in ids else ids


_CHECKPOINT_NAME = re.compile(r"checkpoint_\d{6}")


def snapshot_checkpoints(data: str | bytes) -> dict[str, set[str]]:
    """{trial folder: names of the checkpoint folders it mentions} in one experiment snapshot's text.

    A superset of what Tune can restore from: every ``checkpoint_XXXXXX`` name found in the trial's records,
    its pickled checkpoint manager read as bytes (never unpickled). ValueError when the text is not a
    readable snapshot or a trial has no folder name.
    """
    try:
        out = {}
        for trial_json, runtime_json in json.loads(data)["trial_data"]:
            folder = json.loads(trial_json).get("relative_logdir")
            if not folder:
                raise ValueError("a trial without relative_logdir")
            text = f"{trial_json}{runtime_json}"
            blobs = re.findall(r"[0-9a-f]{40,}", text)  # the hex of CLOUDPICKLE_FALLBACK values
            found = set(_CHECKPOINT_NAME.findall(text))
            for blob in blobs:
                found |= set(_CHECKPOINT_NAME.findall(bytes.fromhex(blob[: len(blob) // 2 * 2]).decode("latin-1")))
            out[folder] = found
        return out
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"not a Tune experiment snapshot: {error!r}") from None


SNAPSHOT_FILE_PREFIXES = (EXPERIMENT_STATE_PREFIX, "searcher-state-", "search_gen_state-")


def damaged_snapshot_files(names: list[str], read) -> list[str]:
    """The newest experiment snapshot's files (``experiment_state-``, ``searcher-state-``,
    ``search_gen_state-`` (a pickle), ``tuner.pkl``) among ``names`` that are torn: JSON that does not parse, a pickle
    whose opcodes do not reach STOP (checked with ``pickletools``, never loaded). ``read(name)`` -> bytes.

    Tune uploads a snapshot by rewriting these files in place, so a driver killed during the upload leaves
    them truncated (seen: an empty ``experiment_state``), and ``Tuner.restore`` then restores no trial.
    """
    import pickletools

    newest = [n for n in names if n == "tuner.pkl"]
    for prefix in SNAPSHOT_FILE_PREFIXES:
        newest += sorted(n for n in names if n.startswith(prefix))[-1:]
    damaged = []
    for name in newest:
        data = read(name)
        try:
            if name.startswith(EXPERIMENT_STATE_PREFIX):  # search_gen_state-*.json is a pickle, despite its name
                json.loads(data)
            else:
                list(pickletools.genops(data))
                if not data.endswith(b"."):
                    raise ValueError("no STOP opcode")
        except Exception:  # noqa: BLE001 (any parse failure means torn)
            damaged.append(name)
    return damaged


# -- Optuna's journal (no Optuna needed) ---------------------------------------------------------------

_CREATE_STUDY, _CREATE_TRIAL, _SET_TRIAL_USER_ATTR = 0, 4, 8  # optuna.storages.journal JournalOperation


def journal_op_codes() -> tuple[int, int]:
    """(create study, create trial): the ``op_code`` of those records in Optuna's journal lines."""
    return _CREATE_STUDY, _CREATE_TRIAL


def read_journal_trial_links(path: str | os.PathLike, study_name: str) -> dict[str, int]:
    """{Tune trial id: Optuna trial number} from the :data:`TUNE_TRIAL_ID_ATTR` user attributes in the
    journal file at ``path``, for the study ``study_name`` (the only study when none has that name).

    A line that is not JSON (a sweep writing its last line) is skipped; {} when nothing links.
    """
    studies: list[str] = []  # study id -> name
    trials: list[tuple[int, int]] = []  # global trial id -> (study id, number in its study)
    per_study: dict[int, int] = {}
    attrs: dict[int, str] = {}  # global trial id -> Tune trial id
    with open(path, encoding="utf-8", errors="replace") as journal:  # a damaged (binary) line is skipped
        for line in journal:
            try:
                op = json.loads(line)
            except ValueError:
                continue
            code = op.get("op_code") if isinstance(op, dict) else None
            if code == _CREATE_STUDY:
                studies.append(op.get("study_name"))
            elif code == _CREATE_TRIAL and isinstance(op.get("study_id"), int):
                study = op["study_id"]
                trials.append((study, per_study.get(study, 0)))
                per_study[study] = per_study.get(study, 0) + 1
            elif code == _SET_TRIAL_USER_ATTR and TUNE_TRIAL_ID_ATTR in (op.get("user_attr") or {}):
                attrs[op.get("trial_id")] = op["user_attr"][TUNE_TRIAL_ID_ATTR]
    wanted = studies.index(study_name) if study_name in studies else (0 if len(studies) == 1 else None)
    return {tune_id: trials[trial][1] for trial, tune_id in attrs.items()
            if isinstance(trial, int) and trial < len(trials) and trials[trial][0] == wanted}
