"""Search spaces: YAML files (docs/method.md, Search spaces) -> an Optuna define-by-run function.

A space file reads::

    objective: min_recall                # or  objectives: [min_recall, mean_recall]  (multi-objective)
    select: max                          # or lcb: how the winner is chosen (selmix_ray.confidence)
    space:
      method: {choice: [selmix, uniform_mixup]}
      s:      {loguniform: [0.1, 100], when: {method: selmix}}
      refresh_every: {int: [2, 100], log: true}
    fixed:
      steps: 2000
      eval_every: 50

Domains: ``uniform: [low, high]``, ``loguniform: [low, high]``, ``int: [low, high]`` (with optional
``log: true``), ``choice: [v1, v2, ...]``. ``when: {param: value}`` (or ``{param: [values]}``) makes a
parameter conditional on the value of a ``choice`` parameter; it is suggested only when every condition
holds. Every key is a ``FinetuneConfig`` field; ``steps`` and ``eval_every`` may only be fixed (early
stopping compares trials at equal steps). ``load_space`` reports every problem in one ``ConfigError``.

This module imports Optuna nowhere: the define-by-run callable only calls ``trial.suggest_*``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from .checks import is_finite, is_int
from .errors import ConfigError, SelMixError
from .mixup import MAP_VARIANTS as MAP_MIXUPS  # need cached spatial maps (FeatureSet.has_maps)

__all__ = ["Param", "SearchSpace", "DefineByRun", "load_space"]

DOMAINS = ("uniform", "loguniform", "int", "choice")
FIXED_ONLY = ("steps", "eval_every", "objective_params")  # may appear under `fixed` only
TOP_LEVEL_KEYS = ("objective", "objectives", "select", "space", "fixed")
SELECTION_RULES = ("max", "lcb")  # as selmix_ray.verdicts.SELECTION_RULES (test_space checks they agree)


@dataclass(frozen=True)
class Param:
    """One searched parameter.

    ``bounds`` is (low, high) for uniform / loguniform / int; ``choices`` the options of a choice.
    ``when`` maps a choice parameter's name to the tuple of values under which this one is active.
    """

    name: str
    domain: str
    bounds: tuple[float, float] | None = None
    choices: tuple | None = None
    log: bool = False
    when: tuple[tuple[str, tuple], ...] = ()

    def is_active(self, values: dict[str, Any]) -> bool:
        """True when every condition holds for the values suggested so far."""
        return all(name in values and values[name] in allowed for name, allowed in self.when)

    def suggest(self, trial) -> Any:
        """Suggest this parameter's value on an Optuna trial (or Ray's suggest captor)."""
        if self.domain == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        low, high = self.bounds
        if self.domain == "int":
            return trial.suggest_int(self.name, int(low), int(high), log=self.log)
        return trial.suggest_float(self.name, float(low), float(high), log=self.domain == "loguniform")

    def to_dict(self) -> dict[str, Any]:
        """Canonical YAML/JSON form: ``{domain: [...], log?: true, when?: {...}}``."""
        out: dict[str, Any] = {self.domain: list(self.choices if self.domain == "choice" else self.bounds)}
        if self.log:
            out["log"] = True
        if self.when:
            out["when"] = {name: list(allowed) for name, allowed in self.when}
        return out


class DefineByRun:
    """Picklable Optuna define-by-run space: ``__call__(trial)`` suggests the active parameters
    in dependency order and returns the fixed values as constants (Ray's OptunaSearch merges them)."""

    def __init__(self, params: tuple[Param, ...], fixed: dict[str, Any]):
        self.params = tuple(params)
        self.fixed = copy.deepcopy(dict(fixed))

    def __call__(self, trial) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for param in self.params:
            if param.is_active(values):
                values[param.name] = param.suggest(trial)
        return copy.deepcopy(self.fixed)

    def __repr__(self) -> str:
        return f"DefineByRun(params={[p.name for p in self.params]}, fixed={self.fixed})"


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space. ``params`` are in suggestion order (conditions before dependents)."""

    objectives: tuple[str, ...]
    params: tuple[Param, ...]
    fixed: dict[str, Any]
    source: str | None = None  # the file it was read from, if any
    select: str = "max"  # the selection rule: "max" or "lcb" (selmix_ray.confidence)

    @property
    def objective(self) -> str:
        """The objective trials train for (the first one when multi-objective)."""
        return self.objectives[0]

    @property
    def is_multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def define_by_run(self) -> DefineByRun:
        """The Optuna define-by-run callable for OptunaSearch (a picklable class instance)."""
        return DefineByRun(self.params, self.fixed)

    def trial_config(self, tune_config: dict[str, Any]) -> dict[str, Any]:
        """objective + fixed + sampled values, ready for ``FinetuneConfig.from_dict``.

        Keys of ``tune_config`` that are not ``FinetuneConfig`` fields (Tune's own bookkeeping) are left out;
        those that are fields (e.g. a ``seed`` set by the search) override the fixed values.
        """
        fields = _config_fields()
        config = {"objective": self.objective, **copy.deepcopy(self.fixed)}
        config.update({k: v for k, v in tune_config.items() if k in fields and k != "objective"})
        return config

    def to_dict(self) -> dict[str, Any]:
        """Canonical, JSON-able form (the YAML layout); equal dicts mean equal spaces."""
        out: dict[str, Any] = {}
        if self.is_multi_objective:
            out["objectives"] = list(self.objectives)
        else:
            out["objective"] = self.objective
        if self.select != "max":  # absent for "max", so spaces written before the key compare equal
            out["select"] = self.select
        out["space"] = {p.name: p.to_dict() for p in sorted(self.params, key=lambda p: p.name)}
        out["fixed"] = {k: self.fixed[k] for k in sorted(self.fixed)}
        return json.loads(json.dumps(out))

    def __str__(self) -> str:
        lines = [f"objective{'s' if self.is_multi_objective else ''}: {', '.join(self.objectives)}"]
        for p in self.params:
            spec = json.dumps(p.to_dict())
            lines.append(f"  {p.name}: {spec}")
        lines.append(f"fixed: {json.dumps(self.fixed)}")
        lines.append(f"select: {self.select}")
        return "\n".join(lines)


def load_space(path_or_dict: str | os.PathLike | dict, *, features=None) -> SearchSpace:
    """Read and validate a search space from a YAML file or a dict; one ConfigError lists every problem.

    With ``features`` (a FeatureSet), the map-level mixups ``cutmix`` / ``puzzlemix`` are offered only when
    ``features.has_maps``: they are dropped from a ``mixup`` choice, and a space that cannot do without them
    is an error.
    """
    if isinstance(path_or_dict, (str, os.PathLike)):
        source = os.fspath(path_or_dict)
        raw = read_yaml(source)
        where = f"search space {source}"
    else:
        raw, source = copy.deepcopy(path_or_dict), None
        where = "search space"
    has_maps = None if features is None else bool(features.has_maps)
    space, problems = _parse(raw, has_maps=has_maps)
    if problems:
        raise ConfigError(problems, where=where)
    return dataclasses.replace(space, source=source)


def parse_yaml(text: str) -> Any:
    """Parse YAML text; ``1e-3`` is read as a float (plain YAML 1.1 would give the string '1e-3')."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
            |\.[0-9_]+(?:[eE][-+][0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
            re.X,
        ),
        list("-+0123456789."),
    )
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: str) -> Any:
    """Read a YAML file with :func:`parse_yaml`; a missing or malformed file is a ConfigError."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"the file {path!r} does not exist; pass the path of a YAML search space.",
                          where="search space")
    try:
        with open(path, encoding="utf-8") as f:
            return parse_yaml(f.read())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}", where="search space") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not a text file ({err.reason} at byte {err.start}); pass a YAML search "
                          "space such as search_spaces/min_recall.yaml.", where="search space") from err
    except OSError as err:
        raise ConfigError(f"{path} cannot be read ({err.strerror or err}).", where="search space") from err


def _config_fields() -> dict[str, Any]:
    from .config import FinetuneConfig

    return {f.name: f for f in dataclasses.fields(FinetuneConfig)}


def _is_scalar(v: Any) -> bool:
    """A JSON scalar (a choice option or a ``when`` value; numpy scalars are not JSON)."""
    return v is None or isinstance(v, (str, bool, int, float))


def _parse(raw: Any, *, has_maps: bool | None) -> tuple[SearchSpace | None, list[str]]:
    """Parse a raw mapping into a SearchSpace, collecting every problem instead of stopping at the first."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        return None, [f"a search space must be a mapping with keys {', '.join(TOP_LEVEL_KEYS)}, "
                      f"but got {type(raw).__name__}."]
    fields = _config_fields()
    unknown_top = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown_top:
        problems.append(f"unknown top-level key(s) {', '.join(map(repr, unknown_top))}; "
                        f"allowed keys are {', '.join(TOP_LEVEL_KEYS)}. Put FinetuneConfig fields under "
                        "'space' or 'fixed'.")

    objectives = _parse_objectives(raw, problems)
    select = raw.get("select", "max")
    if select not in SELECTION_RULES:
        problems.append(f"select must be one of {', '.join(SELECTION_RULES)} (max: the highest validation value; "
                        f"lcb: the highest lower confidence bound), but got {select!r}.")

    fixed_raw = raw.get("fixed") or {}
    if not isinstance(fixed_raw, dict):
        problems.append(f"'fixed' must be a mapping of FinetuneConfig fields to values, but got {fixed_raw!r}.")
        fixed_raw = {}
    space_raw = raw.get("space") or {}
    if not isinstance(space_raw, dict):
        problems.append(f"'space' must be a mapping of FinetuneConfig fields to domains, but got {space_raw!r}.")
        space_raw = {}

    fixed: dict[str, Any] = {}
    for key, value in fixed_raw.items():
        if key == "objective":
            problems.append("fixed.objective: the objective is set at the top level ('objective: NAME'), "
                            "not under 'fixed'.")
        elif key not in fields:
            problems.append(f"fixed.{key}: unknown key; every key must be a FinetuneConfig field "
                            f"({', '.join(sorted(fields))}).")
        else:
            fixed[key] = value

    params: dict[str, Param] = {}
    for name, spec in space_raw.items():
        if name == "objective":
            problems.append("space.objective: the objective cannot be searched (it is what trials are ranked "
                            "by); run one sweep per objective or use 'objectives: [...]'.")
            continue
        if name not in fields:
            problems.append(f"space.{name}: unknown key; every key must be a FinetuneConfig field "
                            f"({', '.join(sorted(fields))}).")
            continue
        if name in FIXED_ONLY:
            problems.append(f"space.{name}: {name} may only be fixed (set it under 'fixed'), so that every "
                            "trial of a sweep is compared at the same steps.")
            continue
        if name in fixed:
            problems.append(f"{name} is both searched under 'space' and set under 'fixed'; keep one.")
        param = _parse_param(name, spec, problems)
        if param is not None:
            params[name] = param

    _check_conditions(params, problems)
    if has_maps is False:
        _drop_map_mixups(params, fixed, problems)
    ordered = _suggestion_order(params, problems)
    if objectives:
        _check_values(objectives, ordered, fixed, problems)
    if problems:
        return None, problems
    return SearchSpace(objectives=tuple(objectives), params=tuple(ordered), fixed=fixed, select=select), []


def _parse_objectives(raw: dict, problems: list[str]) -> list[str]:
    has_one, has_many = "objective" in raw, "objectives" in raw
    if has_one and has_many:
        problems.append("give either 'objective: NAME' or 'objectives: [NAME, NAME, ...]', not both.")
        return []
    if not has_one and not has_many:
        problems.append("the space names no objective; add 'objective: min_recall' (or another objective), "
                        "or 'objectives: [...]' for a multi-objective sweep.")
        return []
    if has_one:
        name = raw["objective"]
        if not isinstance(name, str) or not name:
            problems.append(f"objective must be an objective name, but got {name!r}.")
            return []
        return [name]
    names = raw["objectives"]
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) and n for n in names):
        problems.append(f"objectives must be a list of at least two objective names, but got {names!r}; "
                        "for a single objective write 'objective: NAME'.")
        return []
    if len(set(names)) != len(names):
        problems.append(f"objectives must be distinct, but got {names!r}.")
        return []
    return list(names)


def _parse_param(name: str, spec: Any, problems: list[str]) -> Param | None:
    where = f"space.{name}"
    if not isinstance(spec, dict):
        problems.append(f"{where}: expected a domain such as {{uniform: [low, high]}}, but got {spec!r}; "
                        f"domains are {', '.join(DOMAINS)} (a constant belongs under 'fixed').")
        return None
    domains = [k for k in spec if k in DOMAINS]
    extra = sorted(set(spec) - set(DOMAINS) - {"when", "log"})
    if len(domains) != 1:
        problems.append(f"{where}: needs exactly one domain out of {', '.join(DOMAINS)}, but got "
                        f"{', '.join(map(repr, spec)) or 'none'}.")
        return None
    if extra:
        problems.append(f"{where}: unknown key(s) {', '.join(map(repr, extra))}; allowed are one domain "
                        f"({', '.join(DOMAINS)}), 'log' (int only) and 'when'.")
    domain = domains[0]
    values = spec[domain]
    log = spec.get("log", False)
    if not isinstance(log, bool):
        problems.append(f"{where}: log must be true or false, but got {log!r}.")
        log = False
    if log and domain != "int":
        problems.append(f"{where}: 'log' applies to int only; use loguniform for a log-scaled float.")
        log = False
    when = _parse_when(where, spec.get("when"), problems)
    n_before = len(problems)
    if domain == "choice":
        if not isinstance(values, list) or not values:
            problems.append(f"{where}: choice needs a non-empty list of options, but got {values!r}.")
        elif not all(_is_scalar(v) for v in values):
            problems.append(f"{where}: choice options must be strings, numbers, booleans or null, "
                            f"but got {values!r}.")
        elif len({json.dumps(v) for v in values}) != len(values):
            problems.append(f"{where}: choice options must be distinct, but got {values!r}.")
        if len(problems) > n_before:
            return None
        return Param(name, domain, choices=tuple(values), when=when)
    if not (isinstance(values, list) and len(values) == 2 and all(is_finite(v) for v in values)):
        problems.append(f"{where}: {domain} needs [low, high], two finite numbers, but got {values!r}.")
        return None
    low, high = values
    if domain == "int" and not all(is_int(v) or float(v).is_integer() for v in values):
        problems.append(f"{where}: int needs integer bounds, but got {values!r}.")
        return None
    if not low < high:
        problems.append(f"{where}: the range [{low}, {high}] is empty or a single point; it needs low < high "
                        "(a single value belongs under 'fixed').")
        return None
    if domain == "loguniform" and low <= 0:
        problems.append(f"{where}: loguniform needs low > 0, but got low={low}; use uniform or a positive low.")
        return None
    if domain == "int" and log and low < 1:
        problems.append(f"{where}: int with log: true needs low >= 1, but got low={low}.")
        return None
    if domain == "int":
        bounds = (int(low), int(high))
    else:
        bounds = (float(low), float(high))
    return Param(name, domain, bounds=bounds, log=log, when=when)


def _parse_when(where: str, when: Any, problems: list[str]) -> tuple[tuple[str, tuple], ...]:
    if when is None:
        return ()
    if not isinstance(when, dict) or not when:
        problems.append(f"{where}: when must be a mapping {{param: value}} or {{param: [values]}}, "
                        f"but got {when!r}.")
        return ()
    out = []
    for name, allowed in when.items():
        allowed = allowed if isinstance(allowed, list) else [allowed]
        if not allowed or not all(_is_scalar(v) for v in allowed):
            problems.append(f"{where}: when.{name} must be a value or a non-empty list of values, "
                            f"but got {allowed!r}.")
            continue
        out.append((str(name), tuple(allowed)))
    return tuple(out)


def _check_conditions(params: dict[str, Param], problems: list[str]) -> None:
    """Each `when` must name another choice parameter of the space and only values it can take."""
    for param in list(params.values()):
        for name, allowed in param.when:
            where = f"space.{param.name}.when.{name}"
            other = params.get(name)
            if name == param.name:
                problems.append(f"{where}: a parameter cannot be conditional on itself.")
            elif other is None:
                problems.append(f"{where}: refers to {name!r}, which is not a parameter of the space "
                                f"(parameters: {', '.join(params) or 'none'}).")
            elif other.domain != "choice":
                problems.append(f"{where}: conditions may refer to choice parameters only, but {name!r} is "
                                f"{other.domain}.")
            else:
                unknown = [v for v in allowed if v not in other.choices]
                if unknown:
                    problems.append(f"{where}: value(s) {unknown!r} are not among the choices of {name!r} "
                                    f"({list(other.choices)!r}), so the condition could never hold.")


def _drop_map_mixups(params: dict[str, Param], fixed: dict[str, Any], problems: list[str]) -> None:
    """Without cached maps, cutmix / puzzlemix are not offered."""
    if fixed.get("mixup") in MAP_MIXUPS:
        problems.append(f"fixed.mixup: {fixed['mixup']!r} needs cached spatial maps, but these features have "
                        "none; build them with keep_maps=True or use mixup feature / feature_soft.")
    mixup = params.get("mixup")
    if mixup is None or mixup.domain != "choice":
        return
    kept = tuple(v for v in mixup.choices if v not in MAP_MIXUPS)
    if not kept:
        problems.append(f"space.mixup: every option {list(mixup.choices)!r} needs cached spatial maps, but "
                        "these features have none; add feature or feature_soft, or build with keep_maps=True.")
        return
    params["mixup"] = dataclasses.replace(mixup, choices=kept)
    for name, param in list(params.items()):
        when = []
        for cond, allowed in param.when:
            if cond == "mixup":
                allowed = tuple(v for v in allowed if v not in MAP_MIXUPS)
                if not allowed:
                    # Its condition can never hold without maps: the parameter is never suggested.
                    del params[name]
                    break
            when.append((cond, allowed))
        else:
            params[name] = dataclasses.replace(param, when=tuple(when))


def _suggestion_order(params: dict[str, Param], problems: list[str]) -> list[Param]:
    """Order parameters so that each comes after the ones its `when` refers to (file order otherwise)."""
    ordered: list[Param] = []
    placed: set[str] = set()
    pending = list(params.values())
    while pending:
        progressed = False
        for p in pending:
            if p.name not in placed and all(name in placed or name not in params for name, _ in p.when):
                ordered.append(p)
                placed.add(p.name)
                progressed = True
        pending = [p for p in pending if p.name not in placed]
        if not progressed:
            names = ", ".join(p.name for p in pending)
            problems.append(f"the conditions ('when') of {names} form a cycle; a parameter cannot depend, "
                            "directly or not, on itself.")
            return ordered
    return ordered


def _check_values(objectives: list[str], params: list[Param], fixed: dict[str, Any],
                  problems: list[str]) -> None:
    """Validate objective names, fixed values and every domain's extremes through FinetuneConfig."""
    from .config import FinetuneConfig

    def config_problems(values: dict[str, Any]) -> list[str]:
        try:
            FinetuneConfig.from_dict(values)
        except ConfigError as err:
            return list(err.problems)
        return []

    base = {"objective": objectives[0], **fixed}
    base_problems = config_problems(base)
    problems.extend(f"fixed: {p}" for p in base_problems)
    for param in params:
        probes = param.choices if param.domain == "choice" else param.bounds
        for value in probes:
            for p in config_problems({**base, param.name: value}):
                if p not in base_problems:
                    problems.append(f"space.{param.name} = {value!r}: {p}")
    # FinetuneConfig checks the trained objective only when the rest of the config is valid; check every
    # objective here (the trained one with objective_params, the others with their defaults) and keep the
    # problems FinetuneConfig did not already report.
    objective_params = fixed.get("objective_params") or {}
    if not isinstance(objective_params, dict):
        objective_params = {}
    for index, name in enumerate(objectives):
        for problem in _objective_problems(name, objective_params if index == 0 else {}):
            if problem not in base_problems:
                problems.append(f"objective {name!r}: {problem}")


def _objective_problems(name: str, params: dict[str, Any]) -> list[str]:
    if ":" in name:  # a custom "module:function" objective is imported when a trial builds it
        return []
    from .objectives import get_objective

    try:
        get_objective(name, **params)
    except ConfigError as err:
        return list(err.problems)
    except SelMixError as err:
        return [str(err)]
    return []
