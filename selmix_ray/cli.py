"""selmix-ray command line (`selmix-ray` or `python run_search.py`): a thin layer over the Python API.

    python run_search.py                        # the default demo: MNIST-LT (rho=100), 24 trials, 1-4 min
    python run_search.py search search_spaces/min_recall.yaml --dataset mnist --rho 100 --num-samples 24
    python run_search.py search search_spaces/gmean.yaml steps=1000 lr='{loguniform: [0.3, 3]}'
    python run_search.py resume results/min_recall-20250101-120000
    python run_search.py compare results/a results/b --objective gmean --top 5 --plots plots/
    python run_search.py validate search_spaces/hmean.yaml

Ray, torch and Optuna are imported only by the subcommands that need them; `validate` starts nothing.

Decisions:

- Output: results (tables, the best trial, where the plots are, the command that resumes) are printed;
  progress goes through the ``selmix_ray`` logger, which the CLI shows on stdout as ``[selmix-ray] ...``
  lines (``selmix_ray.progress.enable_console``): INFO by default, warnings only with ``--quiet``, DEBUG
  and Tune's own status tables with ``--verbose``.
- Error texts: the library's errors speak Python (``resume('/path')``, ``storage=``), since they are
  raised for API users. Under the CLI, :func:`cli_text` rewrites those forms into command-line ones
  (``selmix-ray resume PATH``, ``--storage``) before printing (table :data:`CLI_FORMS`), so one error
  class serves both and the CLI never shows Python syntax.
- Commands the CLI suggests name the program as it was started: ``selmix-ray ...`` for the console
  script, ``python run_search.py ...`` from a checkout.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # the repository (search_spaces/ lives there)
DEFAULT_SPACE = REPO / "search_spaces" / "min_recall.yaml"
DEFAULT_STORAGE = "./results"
DEMO_NUM_SAMPLES = 24
QUIET_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage reporting (and no network)
    "RAY_AUTH_MODE": "disabled",  # local clusters without token set-up
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # search() adds the JSON/CSV loggers it needs
    "RAY_DEDUP_LOGS": "0",
}

DESCRIPTION = """\
Hyperparameter search for SelMix fine-tuning on Ray Tune + Optuna.

With no subcommand, runs the default demo: builds (or reads from the cache) MNIST-LT features
(rho = 100, the in-process CNN backbone), searches search_spaces/min_recall.yaml with 24 trials,
prints the best trial next to the baselines on test and writes plots. Ctrl-C leaves a resumable
experiment and prints the command that resumes it.
"""

CALLBACK_CHOICES = ("tensorboard", "mlflow", "wandb")  # selmix_ray.ecosystem.CALLBACK_NAMES, without importing it
# (pattern, replacement) pairs: Python forms in library errors -> the CLI's forms; {prog} is the program
CLI_FORMS = (
    (r"resume\('([^']*)'\)", r"`{prog} resume \1`"),
    (r"Start it again with search\(\) under a new name", r"Start it again with `{prog} search` and another --name"),
    (r"or choose another name\.", r"or choose another --name."),
    (r"run_search\.py / search\(\) created", r"`{prog} search` created"),
    (r"that search\(\) created", r"that `{prog} search` created"),
    (r"as storage=\.", r"as --storage."),
    (r"Pass features= to resume\.", r"Resume it from Python with selmix_ray.resume(PATH, features=...)."),
)

OVERRIDES_HELP = """\
key=value overrides of the space file (the value is read as YAML): a plain value fixes a
FinetuneConfig field (steps=1000, s=5, objective_params='{omega: 20}'; it replaces the field's
domain if the space searched it), a mapping replaces or adds a searched domain
(lr='{loguniform: [0.3, 3]}'), and objective=NAME / objectives='[a, b]' set the objective(s)."""


def program() -> str:
    """How the user started the CLI, for the commands it suggests: ``selmix-ray`` or ``python run_search.py``."""
    return "selmix-ray" if Path(sys.argv[0]).name == "selmix-ray" else "python run_search.py"


def cli_text(message: str) -> str:
    """``message`` with the Python forms of :data:`CLI_FORMS` written as command-line forms."""
    for pattern, replacement in CLI_FORMS:
        message = re.sub(pattern, replacement.replace("{prog}", program()), message)
    return message


def _add_output_options(p: argparse.ArgumentParser, *, default=argparse.SUPPRESS) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="show warnings and results only, no progress lines")
    group.add_argument("-v", "--verbose", action="store_true", default=default,
                       help="show debug lines and Ray Tune's own status tables")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=Path(sys.argv[0]).name or "selmix-ray", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_output_options(parser, default=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = commands.add_parser("search", help="run a sweep over a search space file",
                            description="Run a sweep: Optuna proposes configurations of SPACE, Ray Tune runs "
                                        "them on shared frozen-backbone features.")
    p.add_argument("space", metavar="SPACE", help="search-space YAML file (see search_spaces/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    _add_feature_options(p)
    _add_sweep_options(p, num_samples=DEMO_NUM_SAMPLES)
    p.add_argument("--name", help="experiment name, a new folder under --storage "
                                  "(default: <space file stem>-<date>-<time>)")
    _add_output_options(p)

    p = commands.add_parser("resume", help="continue an interrupted or finished sweep",
                            description="Continue the experiment at PATH: finished trials stay, unfinished "
                                        "ones continue from their last checkpoint, the study and ASHA rungs "
                                        "are restored. Features are rebuilt from the manifest (cache hit).")
    p.add_argument("path", metavar="PATH", help="experiment folder <storage>/<name>")
    _add_address_options(p)
    p.add_argument("--plots", metavar="DIR", help="where to write plots (default: PATH/plots)")
    _add_output_options(p)

    p = commands.add_parser("compare", help="tables and plots of one or more experiments (no Ray)",
                            description="Print each experiment's best trials and baselines, scored by one "
                                        "objective, and optionally write plots. Works while a sweep runs.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="experiment folders <storage>/<name>")
    p.add_argument("--objective", help="re-rank every trial by this objective from its stored confusion "
                                       "counts (default: each experiment's own objective)")
    p.add_argument("--top", type=int, default=10, metavar="N", help="trials shown per experiment (default 10)")
    p.add_argument("--plots", metavar="DIR", help="write the plots of each experiment to DIR/<name>/")
    p.add_argument("--per-class", action="store_true", help="also print per-class test recall of the best "
                                                             "trials next to the starting head")
    p.add_argument("--importance", action="store_true", help="also print parameter importance from the "
                                                              "Optuna study (slow on large studies)")
    p.add_argument("--select", choices=["max", "lcb"], help="rank trials by this selection rule instead of each "
                   "experiment's own: max (highest validation value) or lcb (highest lower confidence bound)")
    p.add_argument("--no-intervals", action="store_true", help="leave out confidence intervals, P(beats the best "
                   "baseline) and the verdict (faster on very large experiments; a ranking by lcb still "
                   "computes the intervals it ranks by)")
    _add_output_options(p)

    p = commands.add_parser("validate", help="check a search-space file without starting anything",
                            description="Check a search-space file (and overrides) and print every problem "
                                        "at once. Exit status 0 when valid, 1 otherwise. Starts no Ray.")
    p.add_argument("space", metavar="FILE", help="search-space YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    _add_output_options(p)
    return parser


def _add_feature_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="mnist",
                   help="digits, mnist, cifar10, cifar100, imagefolder or npz (default mnist)")
    p.add_argument("--rho", type=float, default=100.0, help="imbalance ratio of the labeled split, >= 1 "
                                                            "(default 100)")
    p.add_argument("--backbone", default="cnn", help="'cnn' (trained here once), 'identity', a torchvision "
                                                     "model name or 'package.module:function' (default cnn)")
    p.add_argument("--root", help="dataset folder for cifar10/cifar100/imagefolder/npz")
    p.add_argument("--weights", help="local checkpoint file of a torchvision backbone")
    p.add_argument("--cache-dir", help="feature cache (default $XDG_CACHE_HOME/selmix-ray or "
                                       "~/.cache/selmix-ray)")
    p.add_argument("--keep-maps", action="store_true", help="cache spatial maps too (needed by cutmix and "
                                                            "puzzlemix)")
    p.add_argument("--cut", default="penultimate", choices=["penultimate", "block"],
                   help="penultimate: trials train the head on cached features; block: cache the map entering "
                        "the backbone's last block and train that block with the head (top-block mode, ~100x "
                        "the head-only cost per step; implies --keep-maps) (default penultimate)")


def _add_address_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster address ('auto', 'host:port', 'ray://...'); "
                                     "default: start a local Ray")
    p.add_argument("--connect-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="give up on an --address where nothing answers after this many seconds (default 30)")


def _add_sweep_options(p: argparse.ArgumentParser, *, num_samples: int) -> None:
    p.add_argument("--num-samples", type=int, default=num_samples,
                   help=f"number of trials (configurations) (default {num_samples})")
    p.add_argument("--storage", default=DEFAULT_STORAGE,
                   help="experiments folder: local/NFS path or s3:// gs:// file:// URI (default ./results)")
    p.add_argument("--max-concurrent", type=int, help="at most this many trials at once (default: as many "
                                                      "as the CPUs/GPUs allow)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial, may be fractional "
                                                                     "(default 1)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial, may be fractional, "
                                                                     "e.g. 0.25 (default 0)")
    p.add_argument("--scheduler", default="asha", choices=["asha", "fifo"],
                   help="asha: stop poor trials early on 'step'; fifo: run every trial to the end "
                        "(default asha; multi-objective spaces use none)")
    p.add_argument("--sampler", default="tpe", choices=["tpe", "nsga2", "random"],
                   help="Optuna sampler (default tpe; NSGA-II for multi-objective spaces)")
    p.add_argument("--repeats", type=int, default=1, help="seeds trained per configuration, reported as "
                                                          "their mean; cuts validation noise (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler, trials and features (default 0)")
    _add_address_options(p)
    p.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="checkpoint every N-th report as well as at ASHA's rungs and the end; a retried trial "
                        "replays at most N-1 reports (default: about 10 checkpoints per trial)")
    p.add_argument("--plots", metavar="DIR", help="where to write plots (default: <experiment>/plots)")
    p.add_argument("--callback", action="append", choices=CALLBACK_CHOICES, default=[], metavar="NAME",
                   help="also log every trial with Ray Tune's integration: tensorboard, mlflow or wandb "
                        "(repeatable; the package must be installed). JSON and CSV results, and TensorBoard "
                        "files when tensorboardX is installed, are always written")
    p.add_argument("--select", choices=["max", "lcb"], help="how the winner is chosen: max (highest validation "
                   "value) or lcb (highest lower 90%% confidence bound); default: the space's 'select', else max")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="stop the sweep after this many seconds (Tune's time_budget_s); unfinished trials "
                        "can be resumed")


# -- space + overrides -----------------------------------------------------------------------------------


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply key=value overrides (values read as YAML) to a raw space mapping; see OVERRIDES_HELP."""
    import yaml

    from .errors import ConfigError
    from .space import parse_yaml

    raw = dict(raw or {})
    space = dict(raw.get("space") or {})
    fixed = dict(raw.get("fixed") or {})
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"override {item!r} must look like key=value, e.g. steps=1000.")
            continue
        try:
            value = parse_yaml(text) if text.strip() else None
        except yaml.YAMLError as err:
            problems.append(f"override {item!r}: the value is not valid YAML ({err}).")
            continue
        if key in ("objective", "objectives"):
            raw.pop("objective", None)
            raw.pop("objectives", None)
            raw[key] = value
        elif isinstance(value, dict) and key != "objective_params":
            fixed.pop(key, None)
            space[key] = value
        else:
            space.pop(key, None)
            fixed[key] = value
    if problems:
        raise ConfigError(problems, where="overrides")
    raw["space"], raw["fixed"] = space, fixed
    return raw


def load_space_with_overrides(path: str, overrides: list[str], *, features=None):
    from .space import load_space, read_yaml

    if not overrides:
        return load_space(path, features=features)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        return load_space(path, features=features)  # reports the problem
    return load_space(apply_overrides(raw, overrides), features=features)


# -- subcommands ----------------------------------------------------------------------------------------


def cmd_validate(args) -> int:
    from .errors import ConfigError

    try:
        space = load_space_with_overrides(args.space, args.overrides)
    except ConfigError as err:
        print(f"{args.space}: INVALID, {len(err.problems)} problem(s):")
        for problem in err.problems:
            print(f"  - {problem}")
        return 1
    kind = "multi-objective (NSGA-II, no early stopping)" if space.is_multi_objective else "single objective"
    print(f"{args.space}: OK, {kind}, {len(space.params)} searched parameter(s)")
    print(space)
    return 0


def _build_features(args):
    from .features import build_features

    opts = {}
    for name in ("root", "weights"):
        if getattr(args, name, None):
            opts[name] = getattr(args, name)
    if getattr(args, "keep_maps", False):
        opts["keep_maps"] = True
    if getattr(args, "cut", "penultimate") != "penultimate":
        opts["cut"] = args.cut
    started = time.perf_counter()
    _status(f"features: {args.dataset}, rho={args.rho:g}, backbone={args.backbone} ...")
    features = build_features(args.dataset, rho=args.rho, backbone=args.backbone, cache_dir=args.cache_dir,
                              seed=args.seed, **opts)
    hit = "cache hit" if features.metadata.get("cache_hit") else "built and cached"
    _status(f"features ready in {time.perf_counter() - started:.1f} s ({hit}): "
            f"{features.n_classes} classes, dim {features.dim}, {len(features.train)} labeled train samples")
    return features


def cmd_search(args, *, space_path: str | None = None, overrides: list[str] | None = None) -> int:
    from .ecosystem import missing_package
    from .sweep import search

    missing = [missing_package(name) for name in dict.fromkeys(args.callback) if missing_package(name)]
    if missing:  # said before the features are built
        print("error: " + " ".join(missing).replace("leave", "leave --callback"), file=sys.stderr)
        return 1
    space_path = space_path or args.space
    features = _build_features(args)
    space = load_space_with_overrides(space_path, overrides if overrides is not None else args.overrides,
                                      features=features)
    name = args.name or f"{Path(space_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    experiment = _experiment_path(args.storage, name)
    resources = {"cpu": args.cpus_per_trial}
    if args.gpus_per_trial:
        resources["gpu"] = args.gpus_per_trial
    started = time.perf_counter()
    try:
        run = search(space, features=features, storage=args.storage, name=name, num_samples=args.num_samples,
                     max_concurrent=args.max_concurrent, resources_per_trial=resources,
                     scheduler=args.scheduler, sampler=args.sampler, repeats=args.repeats, seed=args.seed,
                     address=args.address, connect_timeout_s=args.connect_timeout,
                     checkpoint_every=args.checkpoint_every,
                     callbacks=list(dict.fromkeys(args.callback)) or None, time_budget_s=args.time_budget,
                     select=getattr(args, "select", None))
    except KeyboardInterrupt:
        _print_interrupted(experiment)
        return 130
    return _summarise(run, plots=args.plots, num_samples=args.num_samples, seconds=time.perf_counter() - started,
                      time_budget=args.time_budget)


def cmd_resume(args) -> int:
    from .sweep import resume

    try:
        run = resume(args.path, address=args.address, connect_timeout_s=args.connect_timeout)
    except KeyboardInterrupt:
        _print_interrupted(args.path)
        return 130
    return _summarise(run, plots=args.plots, num_samples=None)


def cmd_compare(args) -> int:
    from .comparison import compare

    comparison = compare(args.paths, objective=args.objective, select=args.select, intervals=not args.no_intervals)
    print(comparison.to_string(top=args.top))
    for run in comparison.runs:
        if args.per_class:
            print(f"== {run.name}: per-class test recall (at each trial's best report)"
                  + ("" if args.no_intervals else ", with 90% Wilson intervals"))
            print(run.per_class(top=min(args.top, 3), intervals=not args.no_intervals)
                  .to_string(float_format="{:.3f}".format))
        if args.importance:
            print(f"== {run.name}: parameter importance")
            for name, value in run.importance().items():
                print(f"  {name:<24s} {value:.3f}")
    if args.plots:
        from .plots import write_plots

        for run in comparison.runs:
            folder = Path(args.plots) / run.name if len(comparison.runs) > 1 else Path(args.plots)
            _print_plots(write_plots(run, folder, objective=args.objective, optuna=True))
    return 0


def _best_line(run, best: dict) -> str:
    """The end-of-sweep summary line: the selected trial, its score with its 90% interval and P(beats the best
    baseline) on validation, and its test metrics (with the objective's test interval)."""
    def shown(key: str) -> bool:
        value = best.get(key)
        return isinstance(value, (int, float)) and math.isfinite(value)  # NaN / absent: no history to resample

    val = f" [90% CI {best['val/ci_low']:.3f}, {best['val/ci_high']:.3f}]" if shown("val/ci_low") else ""
    if shown("p_beats_baseline"):
        val += f", P(beats the best baseline) = {best['p_beats_baseline']:.2f} " \
               f"({'paired' if best.get('paired') else 'unpaired'})"
    test = (f", {run.objective} 90% CI [{best['test_at_best/ci_low']:.3f}, {best['test_at_best/ci_high']:.3f}]"
            if shown("test_at_best/ci_low") else "")
    return (f"[run_search] best trial {best['trial_id']} ({best['status']}, select: {run.select}): "
            f"val/best_objective={best['val/best_objective']:.4f} ({run.objective}){val}; on test at its "
            f"best report: min_recall={best['test_at_best/min_recall']:.4f}, "
            f"mean_recall={best['test_at_best/mean_recall']:.4f}{test}")


def _summarise(run, *, plots: str | None, num_samples: int | None, seconds: float | None = None,
               time_budget: float | None = None) -> int:
    """Print the best trial next to the baselines on test, write the plots, say where.

    Exit status 130 when the sweep stopped early (Ctrl-C: Ray Tune catches the first SIGINT, saves the
    experiment and returns), 0 when it ran every trial or its time budget ran out.
    """
    from .comparison import compare
    from .plots import write_plots

    unfinished = int((run.df["status"] == "running").sum())
    stopped = bool(unfinished or (num_samples is not None and len(run.df) < num_samples))
    if seconds is not None:
        print(f"[run_search] sweep {'stopped' if stopped else 'finished'} after {seconds:.1f} s")
    comparison = compare([run.path])
    print(comparison.to_string(top=5))
    best = run.best
    if best is not None:
        print(_best_line(run, best))
    _print_plots(write_plots(run, Path(plots) if plots else run.path / "plots", optuna=True))
    if stopped and time_budget is not None and seconds is not None and seconds >= time_budget:
        print(f"[run_search] the time budget of {time_budget:g} s ran out with {len(run.df)} of {num_samples} "
              f"trials started; continue with: {program()} resume {run.path}")
        return 0
    if stopped:
        _print_interrupted(run.path)
        return 130
    print(f"[run_search] compare again with: {program()} compare {run.path}")
    return 0


def _print_plots(paths) -> None:
    if paths:
        print(f"[run_search] plots written to {Path(paths[0]).parent}: "
              + ", ".join(Path(p).name for p in paths))


def _print_interrupted(path) -> None:
    print(f"\n[run_search] the sweep was interrupted; the experiment is kept at {path}.\n"
          f"[run_search] resume it with: {program()} resume {path}", flush=True)


def _experiment_path(storage: str, name: str) -> str:
    if "://" in storage:
        return f"{storage.rstrip('/')}/{name}"
    return str(Path(storage).expanduser().resolve() / name)


def run_demo() -> int:
    """The default job: MNIST-LT, rho = 100, CNN features (cached), min_recall sweep of 24 trials."""
    args = build_parser().parse_args(["search", str(DEFAULT_SPACE)])
    args.name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"

    _status(f"default demo: {DEFAULT_SPACE.relative_to(REPO)} on mnist (rho=100, CNN backbone), "
            f"{args.num_samples} trials, storage {args.storage}")
    return cmd_search(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Quiet, safe Ray settings, set here (before anything imports ray), never at `import selmix_ray`.
    for key, value in QUIET_RAY_ENV.items():
        os.environ.setdefault(key, value)
    parser = build_parser()
    if not [a for a in argv if a not in ("-q", "--quiet", "-v", "--verbose")]:  # the demo, maybe -q / -v
        _show_progress(parser.parse_args(argv))
        return _guard(run_demo)
    # key=value overrides may come before or after the options: collect those argparse left over.
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _show_progress(args)
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    unknown = [e for e in extra if e not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = list(args.overrides) + overrides
    handler = {"search": cmd_search, "resume": cmd_resume, "compare": cmd_compare, "validate": cmd_validate}
    return _guard(lambda: handler[args.command](args))


def _status(message: str) -> None:
    """One of the CLI's own progress lines: INFO on the ``selmix_ray.cli`` logger, shown as ``[run_search] ...``."""
    logging.getLogger("selmix_ray.cli").info(message)


def _show_progress(args) -> None:
    """Progress lines on stdout: INFO, WARNING with --quiet, DEBUG with --verbose."""
    from .progress import enable_console

    level = logging.WARNING if getattr(args, "quiet", False) else logging.DEBUG if getattr(args, "verbose", False) \
        else logging.INFO
    enable_console(level)


def _guard(action) -> int:
    """Print selmix-ray's errors as one clear message (no traceback, CLI forms: :func:`cli_text`), exit 1."""
    from .errors import SelMixError

    try:
        return action()
    except SelMixError as err:
        print(f"error: {cli_text(str(err))}", file=sys.stderr)
        return 1

