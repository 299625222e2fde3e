"""Progress: the ``selmix_ray`` logger, progress bars that suit the output, and the per-trial lines.

Decisions:

- Library code never prints. Progress goes to the standard ``logging`` logger named ``"selmix_ray"``
  (:data:`LOGGER_NAME`) at INFO; details (e.g. which Tune callbacks run) at DEBUG. The library installs
  no handler: a library user sees the lines once they configure logging (``logging.basicConfig(
  level=logging.INFO)``) or call :func:`enable_console`, which is what the CLI does (INFO by default,
  WARNING with ``--quiet``, DEBUG with ``--verbose``). The console handler writes ``[selmix-ray] <message>``
  to stdout (``[run_search] <message>`` for the CLI's own logger ``selmix_ray.cli``), the lines the demo
  has always shown.
- Progress bars (:func:`bar`): a tqdm bar on an interactive stderr; when stderr is not a terminal (a pipe,
  a log file, a CI job) no carriage-return updates at all, but one INFO line at every 10 % instead.
- :class:`ProgressCallback` prints one line per finished, failed or retried trial. Its counter counts
  every finished trial of the experiment, those finished before a ``resume`` included, so a finished
  6-trial sweep ends at "trial 6/6" whether or not it was resumed; its "best" covers them too.

This module imports neither Ray nor tqdm at import time (the data layer uses :func:`bar`):
:class:`ProgressCallback`, a Ray Tune callback, is defined on first access.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Iterable, Iterator

from .constants import MAX_FAILURES, STEP_KEY

__all__ = ["LOGGER_NAME", "logger", "log", "debug", "enable_console", "bar", "ProgressCallback"]

LOGGER_NAME = "selmix_ray"
PREFIX = "[selmix-ray] "
CLI_PREFIX = "[run_search] "  # the CLI's own progress lines, as the demo has always shown them
logger = logging.getLogger(LOGGER_NAME)
_CONSOLE_MARK = "_selmix_ray_console"  # attribute that marks the handler enable_console installed
TICK_FRACTION = 0.1  # without a terminal, a bar logs one line per this fraction of its total


def log(message: str) -> None:
    """One progress line at INFO on the ``selmix_ray`` logger (shown by :func:`enable_console`)."""
    logger.info(message)


def debug(message: str) -> None:
    """One detail line at DEBUG on the ``selmix_ray`` logger (shown with ``--verbose``)."""
    logger.debug(message)


def enable_console(level: int | str = logging.INFO, *, stream=None) -> logging.Handler:
    """Show selmix-ray's messages at ``level`` and above as ``[selmix-ray] <message>`` lines.

    Installs (once; a second call only changes the level and stream) a handler on the ``selmix_ray``
    logger writing to ``stream`` (default ``sys.stdout`` at the time of each message), and sets the
    logger's level. Messages do not also reach the root logger's handlers. Returns the handler.
    """
    handler = next((h for h in logger.handlers if getattr(h, _CONSOLE_MARK, False)), None)
    if handler is None:
        handler = _StdoutHandler()
        setattr(handler, _CONSOLE_MARK, True)
        handler.setFormatter(_PrefixFormatter())
        logger.addHandler(handler)
    handler.fixed_stream = stream
    logger.setLevel(level)
    logger.propagate = False
    return handler


class _PrefixFormatter(logging.Formatter):
    """``[selmix-ray] <message>``; the CLI's own lines (logger ``selmix_ray.cli``) keep ``[run_search]``."""

    def format(self, record) -> str:
        prefix = CLI_PREFIX if record.name == f"{LOGGER_NAME}.cli" else PREFIX
        return prefix + record.getMessage()


class _StdoutHandler(logging.StreamHandler):
    """A StreamHandler that writes to ``sys.stdout`` as it is when a message comes (pytest and the CLI's
    callers may swap it), unless a fixed stream was given."""

    fixed_stream = None

    def emit(self, record) -> None:
        self.stream = self.fixed_stream or sys.stdout
        super().emit(record)


def is_terminal(stream=None) -> bool:
    """True when ``stream`` (default stderr) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def bar(iterable: Iterable, *, desc: str, total: int | None = None, enabled: bool = True, unit: str = "it"):
    """Iterate ``iterable`` showing progress; returns an iterable with ``set_postfix`` and ``close``.

    On an interactive stderr: a tqdm bar (removed when done). Otherwise (a pipe, a file): no bar and no
    carriage returns, but one INFO line ``"<desc>: <done>/<total> (<percent>%)"`` each time another
    :data:`TICK_FRACTION` of ``total`` is done (nothing when the total is unknown). ``enabled=False``:
    nothing at all.
    """
    if enabled and is_terminal():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=False, unit=unit, mininterval=0.5)
    return _LoggedBar(iterable, desc=desc, total=total, enabled=enabled)


class _LoggedBar:
    """:func:`bar` without a terminal: one log line per 10 %, the latest postfix appended."""

    def __init__(self, iterable: Iterable, *, desc: str, total: int | None, enabled: bool):
        self.iterable = iterable
        self.desc = desc
        self.enabled = enabled
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total = total
        self.postfix = ""

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        pass

    def __iter__(self) -> Iterator:
        total, ticks_done = self.total, 0
        for done, item in enumerate(self.iterable, start=1):
            yield item
            if not self.enabled or not total:
                continue
            ticks = math.floor(done / total / TICK_FRACTION + 1e-9)
            if ticks > ticks_done:
                ticks_done = ticks
                extra = f" {self.postfix}" if self.postfix else ""
                log(f"{self.desc}: {done}/{total} ({100 * done // total}%){extra}")


# -- the per-trial lines (a Ray Tune callback, defined on first access) ---------------------------------


def __getattr__(name: str):
    if name == "ProgressCallback":
        _define_progress_callback()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _finished_trials(trials, trial) -> list:
    """The experiment's finished trials (Tune's TERMINATED or ERROR), ``trial`` counted even before Tune
    marks it (the callbacks run before the status changes)."""
    done = [t for t in trials if t.status in ("TERMINATED", "ERROR") or t is trial]
    return done if trial in done else [*done, trial]


def _define_progress_callback() -> None:
    global ProgressCallback
    from ray.tune import Callback

    class ProgressCallback(Callback):
        """One line on the driver per finished, failed or retried trial (instead of Tune's tables).

        The counter and the best score are read from Tune's list of the experiment's trials at each
        event, so after ``resume`` they include the trials finished before it.
        """

        def __init__(self, *, num_samples: int, steps: int, metric: str):
            self.num_samples = num_samples
            self.steps = steps
            self.metric = metric

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            done = _finished_trials(trials, trial)
            result = trial.last_result or {}
            score = result.get(self.metric, math.nan)
            scores = [(t.last_result or {}).get(self.metric, math.nan) for t in done]
            best = max((s for s in scores if isinstance(s, (int, float)) and math.isfinite(s)), default=math.nan)
            step = int(result.get(STEP_KEY, 0))
            how = "complete" if step >= self.steps else f"pruned at step {step}"
            log(f"trial {len(done)}/{self.num_samples} {trial.trial_id} {how}: {self.metric}={score:.4f} "
                f"(best {best:.4f})")

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            log(f"trial {trial.trial_id} failed for good after {MAX_FAILURES} retries; see {trial.path}")

        def on_trial_recover(self, iteration, trials, trial, **info) -> None:
            log(f"trial {trial.trial_id} raised; retrying it from its last checkpoint")

    # Pickled by reference (Tune keeps the callbacks in tuner.pkl): a resumed run uses this code.
    ProgressCallback.__module__, ProgressCallback.__qualname__ = __name__, "ProgressCallback"
