"""What a killed driver leaves in an experiment, set aside by ``resume`` under the experiment's lock.

A driver killed mid-sweep can leave trial folders that Tune's snapshot on storage never listed (trials it
started after its last snapshot reached storage) and, in listed trials, checkpoints written after that
snapshot. Tune never continues or restores from either, and ``results`` would read them as the
experiment's, so ``resume`` moves them into ``orphaned_trials/`` inside the experiment (a second copy as
``<name>.1``, and so on). Nothing here deletes: a killed driver's orphan may hold finished work, which a
user may want to look at; ``orphaned_trials/`` can be deleted by hand. Every function refuses to act
without the lock (:class:`~selmix_ray.ownership.ExperimentLock`) and does nothing when the newest snapshot
cannot be read.
"""

from __future__ import annotations

from .constants import ORPHANS_DIR
from .progress import log
from .storage import Location
from .tune_files import experiment_state_files, parse_experiment_state, snapshot_checkpoints

__all__ = ["set_aside_orphan_trial_folders", "set_aside_unlisted_checkpoints", "listed_trials", "move_to_orphans"]


def set_aside_orphan_trial_folders(location, lock, *, when: str = "started after the last snapshot") -> list[str]:
    """Move the trial folders that the newest experiment snapshot does not list into ``orphaned_trials/``;
    returns their names. Nothing is deleted: a killed driver's orphan may hold finished work.

    A driver killed after starting a trial but before a snapshot listing it reached storage leaves that
    trial's folder (params.json, maybe results and checkpoints); Tune does not know the trial and never
    continues it, and its Optuna trial is marked FAIL (``StudySearch.reconcile``), so the searcher proposes
    a replacement. Left in place, ``results`` would count it as one of the experiment's trials. Where the
    Ray cluster outlives that driver, its staged files of those trials are still on the node, and the
    resumed run's final sync writes them back into the experiment: ``resume`` therefore calls this before
    and after the run (a second copy is kept as ``<name>.1``, and so on). Nothing moves when no snapshot can
    be read.

    Safe because ``lock`` (the experiment's :class:`~selmix_ray.ownership.ExperimentLock`) is held: no other
    driver is alive that could be running such a trial or be about to snapshot it, so a folder with a
    ``params.json`` that the newest readable snapshot does not list belongs to a driver that died (the
    snapshot Tune restores from is that newest one, and Tune never continues a trial it does not list).
    """
    if not lock.held:
        raise RuntimeError("trial folders are set aside only under the experiment's lock")
    names = location.listdir()
    snapshots = experiment_state_files(names)
    if not snapshots:
        return []
    try:
        known = {trial.relative_logdir for trial in parse_experiment_state(location.read_bytes(snapshots[-1]))}
    except (OSError, ValueError):
        return []
    if None in known:  # a record without its folder name: nothing can be told apart safely
        return []
    orphans = [n for n in names if n not in known and n != ORPHANS_DIR and location.exists(f"{n}/params.json")]
    for name in orphans:
        move_to_orphans(location, name)
    if orphans:
        log(f"set aside {len(orphans)} trial folder(s) unknown to Tune ({when}) in {ORPHANS_DIR}/: "
            f"{', '.join(orphans)}")
    return orphans


def move_to_orphans(location, relative: str) -> None:
    """Move ``relative`` to ``orphaned_trials/<relative>`` (``.1``, ``.2``, ... when that is taken)."""
    target, copy = f"{ORPHANS_DIR}/{relative}", 0
    while location.exists(target):
        copy += 1
        target = f"{ORPHANS_DIR}/{relative}.{copy}"
    location.move_dir(relative, target)


def listed_trials(location) -> int:
    """How many trials the newest readable experiment snapshot lists (0: none readable)."""
    for name in reversed(experiment_state_files(location.listdir())):
        try:
            return len(parse_experiment_state(location.read_bytes(name)))
        except (OSError, ValueError):
            continue
    return 0


def set_aside_unlisted_checkpoints(location, lock) -> list[str]:
    """Move the checkpoint folders of listed trials that the newest snapshot does not mention into
    ``orphaned_trials/<trial folder>/``; returns their "trial/checkpoint" names. Nothing is deleted.

    Called at the end of a resume whose ``tuner.fit()`` returned: Tune has written its final snapshot, and
    with ``num_to_keep=None`` that snapshot mentions every checkpoint a trial registered since it started
    (its checkpoint manager was restored from the previous snapshot and only grew). A checkpoint folder it
    does not mention was written by a killed driver after its last snapshot: Tune never restores from it,
    and ``results`` would take it for the trial's newest. ``lock`` held: no other driver is writing
    checkpoints. Nothing moves when the newest snapshot cannot be read.
    """
    if not lock.held:
        raise RuntimeError("checkpoints are set aside only under the experiment's lock")
    snapshots = experiment_state_files(location.listdir())
    if not snapshots:
        return []
    try:
        mentioned = snapshot_checkpoints(location.read_bytes(snapshots[-1]))
    except (OSError, ValueError):
        return []
    moved = []
    for folder, names in mentioned.items():
        if not location.exists(folder):
            continue
        for entry in Location(location.path, folder).listdir():
            if entry.startswith("checkpoint_") and entry not in names:
                move_to_orphans(location, f"{folder}/{entry}")
                moved.append(f"{folder}/{entry}")
    if moved:
        log(f"set aside {len(moved)} checkpoint(s) that Tune's final snapshot does not list (written by a killed "
            f"driver after its last snapshot) in {ORPHANS_DIR}/")
    return moved
