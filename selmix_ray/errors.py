"""One error hierarchy for selmix-ray.

Every error the library raises on purpose is a :class:`SelMixError`. Messages state the rule, the value
that broke it and, where there is one, the fix.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "SelMixError",
    "ConfigError",
    "DataError",
    "UndefinedMetricError",
    "ExperimentError",
    "SweepFailedError",
    "TrainingError",
]


class SelMixError(Exception):
    """Root of every error selmix-ray raises on purpose."""


class ConfigError(SelMixError, ValueError):
    """A configuration, search space or argument is invalid.

    Collects every problem found, not only the first: ``problems`` lists them, one sentence each.
    """

    def __init__(self, problems: str | Iterable[str], *, where: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if not self.problems:
            raise ValueError("ConfigError needs at least one problem.")
        head = f"Invalid {where}" if where else "Invalid configuration"
        if len(self.problems) == 1:
            message = f"{head}: {self.problems[0]}"
        else:
            lines = "\n".join(f"  - {problem}" for problem in self.problems)
            message = f"{head} ({len(self.problems)} problems):\n{lines}"
        super().__init__(message)


class DataError(SelMixError, ValueError):
    """Input data is malformed: wrong shape, NaN/inf, negative counts, missing files or classes."""


class UndefinedMetricError(DataError):
    """A metric is undefined for this input, e.g. a class has no validation sample."""


class ExperimentError(SelMixError):
    """An experiment directory cannot be created, resumed or read as asked."""


class SweepFailedError(ExperimentError):
    """Every trial of a sweep errored; the message carries the first trial's error. The experiment is kept."""


class TrainingError(SelMixError, RuntimeError):
    """Training diverged (non-finite loss or weights) and was stopped."""
