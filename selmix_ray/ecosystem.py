"""The ecosystem around a sweep: Tune callbacks and stopping, Tune's ResultGrid and the Optuna study.

Decisions:

- Loggers. Every sweep, from the CLI or the Python API alike, writes Tune's JSON and CSV results (``results``
  and Tune's dataframes need them) and TensorBoard event files when ``tensorboardX`` is installed
  (:func:`default_loggers`; ``tensorboard --logdir <experiment>`` then works). ``search`` passes these
  explicitly, so Tune adds none of its own whether or not ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS`` is set.
- ``callbacks``: Ray Tune ``Callback`` instances, or the names ``"tensorboard"``, ``"mlflow"``, ``"wandb"``
  (:data:`CALLBACK_NAMES`) for Tune's own integrations. A name whose package is not installed is refused
  before anything starts, with one line saying which package to install. ``"tensorboard"`` names the
  default TensorBoard logger: naming it makes tensorboardX required. MLflow logs to the experiment named
  like the sweep (``MLFLOW_TRACKING_URI`` or ``./mlruns``); W&B to the project named like the sweep.
- ``time_budget_s`` (TuneConfig) and ``stop`` (RunConfig: a dict, a function or a ``Stopper``) go to Tune
  as they are. A trial that ``stop`` ends before ``steps`` is told to Optuna as PRUNED, like one that ASHA
  stops. Both, and the callbacks, are kept in Tune's ``tuner.pkl``, so ``resume`` applies them again.
- Link ids: each Optuna trial carries its Tune trial id as the user attribute ``"tune_trial_id"``
  (:data:`selmix_ray.tune_adapter.TUNE_TRIAL_ID_ATTR`, set when the trial is asked), and ``Run.df`` has
  the Optuna trial number in ``optuna_trial`` (NaN for experiments made before the link existed), read
  from the journal file without importing Optuna, so loading results stays as light as before.
- ``Run.study`` loads the Optuna study from the experiment's journal for reading; writing to it (``tell``,
  ``enqueue_trial``) while a sweep runs would change what the sweep's searcher sees.
- ``Run.result_grid()`` gives Tune's ``ResultGrid`` through ``Tuner.restore(path, trainable=run_trial)``;
  it needs Ray installed (not running: nothing is fitted).
"""

from __future__ import annotations

import math
import os
from importlib.util import find_spec
from pathlib import Path

from .checks import is_number
from .constants import JOURNAL_FILE
from .errors import ExperimentError
from .tune_adapter import read_journal_trial_links

__all__ = ["CALLBACK_NAMES", "CALLBACK_PACKAGES", "missing_package", "callback_problems", "tune_callbacks",
           "default_loggers", "stop_problems", "load_study", "optuna_trial_numbers", "result_grid"]

CALLBACK_PACKAGES = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}  # name -> module
CALLBACK_NAMES = tuple(CALLBACK_PACKAGES)


def missing_package(name: str) -> str | None:
    """One sentence when the package behind callback ``name`` is not installed; None when it is."""
    module = CALLBACK_PACKAGES[name]
    if find_spec(module) is not None:
        return None
    return (f"callback {name!r} needs the {module} package, which is not installed in this Python "
            f"({os.path.basename(os.sys.executable)}): pip install {module.lower()}, or leave {name!r} out.")


def callback_problems(callbacks) -> list[str]:
    """Problems with a ``callbacks`` argument (None, or a list of Tune Callbacks and names); [] if none."""
    if callbacks is None:
        return []
    if isinstance(callbacks, (str, bytes)) or not isinstance(callbacks, (list, tuple)):
        return [f"callbacks must be a list of Ray Tune Callback objects or names from "
                f"{', '.join(CALLBACK_NAMES)}, but got {callbacks!r}."]
    from ray.tune import Callback

    problems = []
    for item in callbacks:
        if isinstance(item, str):
            if item not in CALLBACK_PACKAGES:
                problems.append(f"callback {item!r} is not a known name; use one of {', '.join(CALLBACK_NAMES)} "
                                "or pass a ray.tune.Callback object.")
            elif missing_package(item):
                problems.append(missing_package(item))
        elif not isinstance(item, Callback):
            what = f"the class {item.__name__}" if isinstance(item, type) else repr(item)
            problems.append(f"callbacks[...] must be a ray.tune.Callback object or a name from "
                            f"{', '.join(CALLBACK_NAMES)}, but got {what}; pass an instance, e.g. {what}().")
    return problems


def stop_problems(*, time_budget_s=None, stop=None) -> list[str]:
    """Problems with ``time_budget_s`` (a number > 0 or None) and ``stop`` (dict, callable, Stopper)."""
    problems = []
    if time_budget_s is not None and not (is_number(time_budget_s) and math.isfinite(time_budget_s)
                                          and time_budget_s > 0):
        problems.append(f"time_budget_s must be a number of seconds > 0, but got {time_budget_s!r}.")
    if stop is not None and not (isinstance(stop, dict) or callable(stop)):
        problems.append(f"stop must be a dict such as {{'val/objective': 0.9}}, a function (trial_id, result) "
                        f"-> bool or a ray.tune.Stopper, but got {stop!r}.")
    return problems


def default_loggers() -> list:
    """Tune's JSON and CSV loggers, and its TensorBoard logger when tensorboardX is installed."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    loggers = [JsonLoggerCallback(), CSVLoggerCallback()]
    if find_spec("tensorboardX") is not None:
        from ray.tune.logger import TBXLoggerCallback

        loggers.append(TBXLoggerCallback())
    return loggers


def tune_callbacks(callbacks, *, name: str) -> list:
    """The default loggers, then ``callbacks`` with names made Tune callbacks (checked beforehand by
    :func:`callback_problems`); a name already among the defaults is not added twice."""
    out = default_loggers()
    for item in callbacks or []:
        if item == "tensorboard":
            continue  # a default logger (tensorboardX is installed, or callback_problems refused it)
        if item == "mlflow":
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            item = MLflowLoggerCallback(experiment_name=name)
        elif item == "wandb":
            from ray.air.integrations.wandb import WandbLoggerCallback

            item = WandbLoggerCallback(project=name)
        out.append(item)
    return out


# -- Optuna and Tune objects of an experiment ---------------------------------------------------------


def load_study(path: str | os.PathLike, name: str):
    """The Optuna study of the experiment at ``path`` (study ``name`` in its journal; the only study when
    there is one under another name). For reading."""
    import optuna

    from .storage import journal_storage

    journal = Path(path) / JOURNAL_FILE
    if not journal.is_file():
        raise ExperimentError(f"{path} has no {JOURNAL_FILE}, so it has no Optuna study to load.")
    storage = journal_storage(journal)
    names = [summary.study_name for summary in optuna.get_all_study_summaries(storage)]
    study_name = name if name in names else (names[0] if len(names) == 1 else None)
    if study_name is None:
        raise ExperimentError(f"{journal} holds no study named {name!r} (it holds {names or 'none'}).")
    return optuna.load_study(study_name=study_name, storage=storage)


def optuna_trial_numbers(path: str | os.PathLike, name: str) -> dict[str, int]:
    """{Tune trial id: Optuna trial number} from the study's ``tune_trial_id`` user attributes; {} when the
    experiment has no journal yet or was made before the attributes existed. Reads the journal file
    without importing Optuna (``results`` stays light: tune_adapter.read_journal_trial_links)."""
    journal = Path(path) / JOURNAL_FILE
    if not journal.is_file():
        return {}
    return read_journal_trial_links(journal, name)


def result_grid(path: str | os.PathLike):
    """Tune's ``ResultGrid`` of the experiment at ``path`` (``Tuner.restore(...).get_results()``)."""
    from ray import tune

    from .trainable import run_trial

    path = os.fspath(Path(path).resolve())
    if not tune.Tuner.can_restore(path):
        raise ExperimentError(f"Ray Tune saved no experiment state in {path} yet, so it has no ResultGrid.")
    return tune.Tuner.restore(path, trainable=run_trial).get_results()
