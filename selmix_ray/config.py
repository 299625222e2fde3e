"""The configuration of one trial: :class:`FinetuneConfig`, its vocabularies and its checks.

torch-free: the search space, the CLI's ``validate`` and the engine all check a config here.
Every problem is collected and raised at once as one :class:`~selmix_ray.errors.ConfigError`.

Each vocabulary has one home: the mixup variants are ``mixup.VARIANTS``, the post-hoc kinds
``posthoc.KINDS``, the gain forms and Jacobians ``gain.GAIN_FORMS``/``gain.JACOBIANS`` (imported here; none of
those modules imports torch at module level); the methods, gain scales, lr scales and devices are the
config's own. Integers are ``int`` or numpy integers, numbers also floats, never ``bool`` (``checks``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .checks import is_finite, is_int, is_number
from .errors import ConfigError
from .gain import GAIN_FORMS, JACOBIANS
from .mixup import VARIANTS as MIXUPS
from .objectives import get_objective
from .posthoc import KINDS as POSTHOCS

__all__ = ["FinetuneConfig"]

METHODS = ("selmix", "uniform_mixup", "erm")
GAIN_SCALES = ("max", "none")
LR_SCALES = ("feature_norm", "none")
DEVICES = ("auto", "cpu", "cuda")
OBJECTIVE_PARAMS = ("omega", "beta", "alpha", "tau", "mu_max", "eps")
# Relative rate of the top block. mnist rho=100 (60-epoch CNN), seeds 100-103, SelMix: top_lr 10 and 30 tie
# (test min recall 0.80 either way; 0.82 vs 0.80 with post-hoc class weights); 100 diverged on one seed in four.
TOP_LR_DEFAULT = 10.0


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything one trial needs besides the features (docs/method.md, "One trial").

    Attributes:
        method: ``selmix`` (pairs from P = softmax(s·G)) | ``uniform_mixup`` (the same loop, pairs uniform:
            no mask, s = 0) | ``erm`` (instances drawn uniformly, no mixup).
        objective: the objective trained for and ranked by (``objectives.get_objective``), or
            ``"module:function"`` for a custom torch function of the confusion matrix.
        objective_params: the objective's parameters, a subset of omega, beta, alpha, tau, mu_max, eps.
        s: inverse temperature of P = softmax(s·G); with ``gain_scale="max"`` the log-odds between the best
            pair and a zero-gain pair.
        gain_scale: ``max`` (G / max|G| before the softmax) | ``none`` (raw G, the released behaviour).
        gain_form: ``exact`` (the closed-form directional derivative) | ``official`` (the released formula).
        jacobian: the confusion the gain's Jacobian is evaluated at: ``surrogate`` (the smooth C(A)) |
            ``measured`` (the measured C).
        train_bias: train the head's bias (and include it in the gain).
        mixup: ``feature`` | ``feature_soft`` | ``cutmix`` | ``puzzlemix`` (the last two need cached maps).
        lambda_min: the class-i sample's mixing weight is drawn from U(lambda_min, 1).
        floor: the exploration floor ε of P (its share of uniform mass); None means 1/(K+1).
        positive_only: pairs whose gain is <= 0 get no mass before the floor.
        lr: the head's learning rate; relative to the mean squared norm of the training features when
            ``lr_scale="feature_norm"`` (optimiser rate = lr / mean‖z‖²).
        lr_scale: ``feature_norm`` (lr and top_lr are relative) | ``none`` (both are taken as given).
        top_lr: top-block mode only (features built with ``cut="block"``): the block's learning rate,
            relative to the mean squared norm of its input maps when ``lr_scale="feature_norm"``.
        momentum: SGD momentum, in [0, 1).
        weight_decay: SGD L2 weight decay on the head (weight and trained bias) and the block.
        batch_size: pairs (instances for ``erm``) per SGD step.
        steps: SGD steps of the trial; a multiple of ``eval_every``. 0 evaluates the starting head.
        refresh_every: steps between refreshes of the gain, P and the pseudo-labels.
        eval_every: steps between reports (a validation and test evaluation each).
        pseudo_label_threshold: the least softmax confidence for which an unlabeled sample may be a partner.
        posthoc: the correction fitted on validation after training: ``none`` | ``logit_adjust`` |
            ``class_weights``.
        device: ``auto`` (CUDA when available, else the CPU) | ``cpu`` | ``cuda`` | ``cuda:N``.
        seed: seeds the trial's numpy and torch generators.
    """

    method: str = "selmix"
    objective: str = "min_recall"
    objective_params: dict = field(default_factory=dict)
    s: float = 5.0
    gain_scale: str = "max"
    gain_form: str = "exact"
    jacobian: str = "surrogate"
    train_bias: bool = True
    mixup: str = "feature"
    lambda_min: float = 0.6
    floor: float | None = None
    positive_only: bool = True
    lr: float = 1.0
    lr_scale: str = "feature_norm"
    top_lr: float = TOP_LR_DEFAULT
    momentum: float = 0.0
    weight_decay: float = 5e-4
    batch_size: int = 64
    steps: int = 2000
    refresh_every: int = 10
    eval_every: int = 50
    pseudo_label_threshold: float = 0.0
    posthoc: str = "none"
    device: str = "auto"
    seed: int = 0

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():  # numpy scalars become Python ones (JSON-able)
            if isinstance(value, np.generic) and not isinstance(value, np.bool_):
                object.__setattr__(self, name, value.item())
        problems = _config_problems(dataclasses.asdict(self))
        if problems:
            raise ConfigError(problems, where="FinetuneConfig")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FinetuneConfig:
        """Build from a plain dict (YAML, Tune); raises one ConfigError listing every problem.

        Integers are accepted for float fields and integral floats for integer fields.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        problems = []
        unknown = sorted(set(values) - known)
        if unknown:
            problems.append(
                f"unknown field(s) {', '.join(map(repr, unknown))}; known fields are {', '.join(sorted(known))}."
            )
        merged = dataclasses.asdict(cls())
        merged.update({k: v for k, v in values.items() if k in known})
        merged, coerce_problems = _coerce(merged)
        problems += coerce_problems
        problems += _config_problems(merged, skip={p.split(" ")[0] for p in coerce_problems})
        if problems:
            raise ConfigError(problems, where="FinetuneConfig")
        return cls(**merged)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable dict; ``FinetuneConfig.from_dict(c.to_dict()) == c``."""
        out = dataclasses.asdict(self)
        out["objective_params"] = dict(self.objective_params)
        return out


_FLOAT_FIELDS = ("s", "lambda_min", "lr", "top_lr", "momentum", "weight_decay", "pseudo_label_threshold")
_INT_FIELDS = ("batch_size", "steps", "refresh_every", "eval_every", "seed")
_BOOL_FIELDS = ("train_bias", "positive_only")


def _coerce(values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Convert ints to floats and integral floats to ints; type problems start with the field name."""
    out, problems = dict(values), []
    for name in _FLOAT_FIELDS + ("floor",):
        v = out[name]
        if name == "floor" and v is None:
            continue
        if not is_number(v):
            problems.append(f"{name} must be a number, but got {v!r}.")
        else:
            out[name] = float(v)
    for name in _INT_FIELDS:
        v = out[name]
        if is_int(v) or (isinstance(v, float) and v.is_integer()):
            out[name] = int(v)
        else:
            problems.append(f"{name} must be an integer, but got {v!r}.")
    for name in _BOOL_FIELDS:
        if not isinstance(out[name], bool):
            problems.append(f"{name} must be true or false, but got {out[name]!r}.")
    if not isinstance(out["objective_params"], dict):
        problems.append(f"objective_params must be a mapping, but got {out['objective_params']!r}.")
    else:
        out["objective_params"] = dict(out["objective_params"])
    return out, problems


def _config_problems(c: dict[str, Any], *, skip: set[str] = frozenset()) -> list[str]:
    """Every value problem of a config dict (types assumed right except for the fields in ``skip``)."""
    problems = []

    def choice(name, allowed):
        if c[name] not in allowed:
            problems.append(f"{name} must be one of {', '.join(allowed)}, but got {c[name]!r}.")

    def check(name, ok, rule):
        if name not in skip and not ok(c[name]):
            problems.append(f"{name} must be {rule}, but got {name}={c[name]!r}.")

    choice("method", METHODS)
    choice("gain_scale", GAIN_SCALES)
    choice("gain_form", GAIN_FORMS)
    choice("jacobian", JACOBIANS)
    choice("mixup", MIXUPS)
    choice("lr_scale", LR_SCALES)
    choice("posthoc", POSTHOCS)
    device = c["device"]
    if not (device in DEVICES or (isinstance(device, str) and device.startswith("cuda:")
                                  and device[5:].isdigit())):
        problems.append(f"device must be one of auto, cpu, cuda or cuda:N, but got {device!r}.")
    if not isinstance(c["objective"], str) or not c["objective"]:
        problems.append(f"objective must be an objective name, but got {c['objective']!r}.")
    check("s", lambda v: is_finite(v) and v >= 0, ">= 0 and finite")
    check("lambda_min", lambda v: is_finite(v) and 0 <= v <= 1, "in [0, 1]")
    check("floor", lambda v: v is None or (is_finite(v) and 0 <= v <= 1), "None or in [0, 1]")
    check("lr", lambda v: is_finite(v) and v > 0, "> 0 and finite")
    check("top_lr", lambda v: is_finite(v) and v >= 0, ">= 0 and finite (0 freezes the top block)")
    check("momentum", lambda v: is_finite(v) and 0 <= v < 1, "in [0, 1)")
    check("weight_decay", lambda v: is_finite(v) and v >= 0, ">= 0 and finite")
    check("pseudo_label_threshold", lambda v: is_finite(v) and 0 <= v <= 1, "in [0, 1]")
    check("batch_size", lambda v: is_int(v) and v >= 1, ">= 1")
    check("steps", lambda v: is_int(v) and v >= 0, ">= 0")
    check("refresh_every", lambda v: is_int(v) and v >= 1, ">= 1")
    check("eval_every", lambda v: is_int(v) and v >= 1, ">= 1")
    check("seed", lambda v: is_int(v) and v >= 0, ">= 0")
    steps, eval_every = c["steps"], c["eval_every"]
    if is_int(steps) and is_int(eval_every) and eval_every >= 1 and steps >= 0 and steps % eval_every:
        problems.append(
            f"steps must be a multiple of eval_every, but got {steps=} and {eval_every=}; "
            f"use steps={(steps // eval_every + 1) * eval_every} or change eval_every."
        )
    if c["gain_form"] == "official" and c["mixup"] == "feature_soft":
        problems.append(
            "gain_form 'official' is undefined with a soft target, but got mixup='feature_soft'; "
            "use gain_form='exact' or mixup='feature'."
        )
    params = c["objective_params"]
    if isinstance(params, dict):
        unknown = sorted(set(params) - set(OBJECTIVE_PARAMS))
        if unknown:
            problems.append(
                f"objective_params has unknown key(s) {', '.join(map(repr, unknown))}; "
                f"known keys are {', '.join(OBJECTIVE_PARAMS)}."
            )
        for key, v in params.items():
            if key in OBJECTIVE_PARAMS and not is_finite(v):
                problems.append(f"objective_params[{key!r}] must be a finite number, but got {v!r}.")
        if not problems and isinstance(c["objective"], str) and ":" not in c["objective"]:
            # the objective checks its name and which parameters it accepts (custom ones are imported later)
            try:
                get_objective(c["objective"], **params)
            except ConfigError as error:
                problems += error.problems
    return problems
