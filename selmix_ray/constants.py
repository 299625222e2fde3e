"""File names and reserved keys shared by the writers (trainable, search) and the reader (results)."""

from __future__ import annotations

# Experiment directory: <storage>/<name>/
MANIFEST_FILE = "selmix_run.json"
JOURNAL_FILE = "optuna_journal.log"  # the only file whose name contains "journal"
SCHEDULER_STATE_FILE = "scheduler_state.json"  # ASHA's rungs as JSON data (never a pickle)
LEGACY_SCHEDULER_STATE_FILE = "scheduler_state.pkl"  # what experiments before JSON wrote (resume reads it)
BASELINES_FILE = "baselines.json"
ORPHANS_DIR = "orphaned_trials"  # where resume sets aside the trial folders a killed driver left unrecorded

# Inside each Tune checkpoint directory.
STATE_FILE = "finetune_state.pt"  # FinetuneState (torch.save)
HISTORY_FILE = "history.json"  # History (plain JSON, readable without torch)

# Scalars every report carries (docs/method.md, One trial).
METRIC_NAMES = (
    "mean_recall",
    "min_recall",
    "min_head_tail_recall",
    "gmean",
    "hmean",
    "min_coverage",
    "accuracy",
    "objective",
)
SCORE_KEY = "val/best_objective"  # the selection rule: one score for Optuna, ASHA and Run.best
STEP_KEY = "step"
MAX_FAILURES = 3  # Tune retries of a failing trial, each from its last checkpoint

HEAD_FRACTION = 0.9  # the first floor(0.9 K) classes by training count are the head
