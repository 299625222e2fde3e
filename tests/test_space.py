"""Search spaces: shipped files load, define-by-run honours `when`, bad spaces list every problem."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest

from selmix_ray.engine import FinetuneConfig
from selmix_ray.errors import ConfigError
from selmix_ray.space import DefineByRun, load_space

SPACES_DIR = Path(__file__).resolve().parents[1] / "search_spaces"
SHIPPED = sorted(SPACES_DIR.glob("*.yaml"))


def test_the_five_spec_files_are_shipped():
    names = {p.name for p in SHIPPED}
    assert names >= {"min_recall.yaml", "gmean.yaml", "hmean.yaml", "mean_recall_min_coverage.yaml",
                     "min_recall_vs_mean_recall.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_space_loads_and_starts_with_its_command(path):
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# python run_search.py search ") and path.name in first_line
    space = load_space(path)
    assert space.fixed["eval_every"] > 0 and space.fixed["steps"] % space.fixed["eval_every"] == 0
    # Both ends of every range and every option give a valid FinetuneConfig.
    for param in space.params:
        for value in param.choices or param.bounds:
            FinetuneConfig.from_dict(space.trial_config({param.name: value}))


def test_default_demo_space_is_quick_and_has_no_map_mixups():
    space = load_space(SPACES_DIR / "min_recall.yaml")
    assert space.objective == "min_recall" and not space.is_multi_objective
    assert space.fixed["steps"] <= 2000 and space.fixed["eval_every"] == 50
    mixup = {p.name: p for p in space.params}.get("mixup")
    assert mixup is None or not set(mixup.choices) & {"cutmix", "puzzlemix"}


def test_multi_objective_space():
    space = load_space(SPACES_DIR / "min_recall_vs_mean_recall.yaml")
    assert space.is_multi_objective and space.objectives == ("min_recall", "mean_recall")
    assert space.objective == "min_recall"
    assert space.trial_config({})["objective"] == "min_recall"


def _study():
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna, optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=3))


def test_define_by_run_respects_when_and_survives_pickle():
    space = load_space({
        "objective": "min_recall",
        "space": {
            "s": {"loguniform": [0.1, 100], "when": {"method": "selmix"}},  # listed before its condition
            "method": {"choice": ["selmix", "uniform_mixup", "erm"]},
            "lambda_min": {"uniform": [0.5, 0.9], "when": {"method": ["selmix", "uniform_mixup"]}},
            "refresh_every": {"int": [2, 100], "log": True},
        },
        "fixed": {"steps": 100, "eval_every": 50, "objective_params": {"omega": 20}},
    })
    assert space.param_names.index("method") < space.param_names.index("s")
    define_by_run = pickle.loads(pickle.dumps(space.define_by_run()))
    assert isinstance(define_by_run, DefineByRun)
    optuna, study = _study()
    seen = set()
    for _ in range(40):
        trial = study.ask()
        constants = define_by_run(trial)
        assert constants == {"steps": 100, "eval_every": 50, "objective_params": {"omega": 20}}
        params = trial.params
        method = params["method"]
        seen.add(method)
        assert ("s" in params) == (method == "selmix")
        assert ("lambda_min" in params) == (method != "erm")
        assert 2 <= params["refresh_every"] <= 100 and isinstance(params["refresh_every"], int)
        config = space.trial_config({**params, **constants})
        assert config["objective"] == "min_recall"
        FinetuneConfig.from_dict(config)
        study.tell(trial, 0.5)
    assert seen == {"selmix", "uniform_mixup", "erm"}
    # The constants returned are copies: mutating them does not change the space.
    define_by_run(study.ask())["objective_params"]["omega"] = 1
    assert define_by_run(study.ask())["objective_params"] == {"omega": 20}


def test_trial_config_keeps_config_fields_only():
    space = load_space(SPACES_DIR / "min_recall.yaml")
    config = space.trial_config({"lr": 2.0, "method": "erm", "seed": 3, "__trial_index__": 7})
    assert config == {"objective": "min_recall", "steps": 2000, "eval_every": 50, "lr": 2.0,
                      "method": "erm", "seed": 3}


def test_to_dict_is_canonical_and_json_able():
    a = load_space({"objective": "gmean", "space": {"lr": {"loguniform": [0.1, 10]},
                                                  "method": {"choice": ["selmix", "erm"]}},
                    "fixed": {"steps": 100, "eval_every": 50}})
    b = load_space({"fixed": {"eval_every": 50, "steps": 100}, "objective": "gmean",
                    "space": {"method": {"choice": ["selmix", "erm"]}, "lr": {"loguniform": [0.1, 10.0]}}})
    assert a.to_dict() == b.to_dict()
    assert load_space(a.to_dict()).to_dict() == a.to_dict()  # round trip
    c = load_space({**b.to_dict(), "fixed": {"eval_every": 50, "steps": 200}})
    assert c.to_dict() != a.to_dict()


def test_map_mixups_are_offered_only_with_maps():
    raw = {"objective": "min_recall",
           "space": {"mixup": {"choice": ["feature", "cutmix", "puzzlemix"]},
                     "lambda_min": {"uniform": [0.5, 0.9], "when": {"mixup": "cutmix"}}}}
    with_maps = load_space(raw, features=SimpleNamespace(has_maps=True))
    assert with_maps.params[0].choices == ("feature", "cutmix", "puzzlemix")
    without = load_space(raw, features=SimpleNamespace(has_maps=False))
    assert without.param_names == ("mixup",) and without.params[0].choices == ("feature",)
    assert load_space(raw).params[0].choices == ("feature", "cutmix", "puzzlemix")  # no features: unchecked
    with pytest.raises(ConfigError, match="cached spatial maps"):
        load_space({"objective": "min_recall", "space": {"mixup": {"choice": ["cutmix"]}}},
                   features=SimpleNamespace(has_maps=False))
    with pytest.raises(ConfigError, match="cached spatial maps"):
        load_space({"objective": "min_recall", "fixed": {"mixup": "puzzlemix"}},
                   features=SimpleNamespace(has_maps=False))


def test_bad_space_lists_every_problem_at_once():
    bad = {
        "objective": "min_recall",
        "colour": "red",
        "space": {
            "foo": {"uniform": [0, 1]},
            "lr": {"uniform": [2, 1]},
            "s": {"loguniform": [0, 10]},
            "steps": {"int": [100, 200]},
            "method": {"choice": ["selmix", "best"]},
            "momentum": {"gaussian": [0, 1]},
            "lambda_min": {"uniform": [0.5, 0.9], "when": {"method": "magic", "ghost": 1}},
            "refresh_every": {"int": [1.5, 4]},
            "batch_size": {"choice": []},
        },
        "fixed": {"eval_every": 50, "steps": 120, "bogus": 1},
    }
    with pytest.raises(ConfigError) as info:
        load_space(bad)
    text = "\n".join(info.value.problems)
    expected = ["'colour'", "space.foo: unknown key", "space.lr: the range [2, 1] is empty",
                "space.s: loguniform needs low > 0", "space.steps: steps may only be fixed",
                "space.method = 'best'", "space.momentum: needs exactly one domain",
                "when.method: value(s) ['magic']", "when.ghost: refers to 'ghost'",
                "space.refresh_every: int needs integer bounds", "space.batch_size: choice needs a non-empty",
                "fixed.bogus: unknown key", "steps must be a multiple of eval_every"]
    for fragment in expected:
        assert fragment in text, fragment
    assert len(info.value.problems) == len(expected)


@pytest.mark.parametrize("raw, fragment", [
    ({"space": {}}, "names no objective"),
    ({"objective": "min_recall", "objectives": ["a", "b"]}, "not both"),
    ({"objectives": ["min_recall"]}, "at least two"),
    ({"objectives": ["min_recall", "nope"]}, "Unknown objective 'nope'"),
    ({"objective": "min_recall", "fixed": {"objective_params": {"alpha": 0.9}}}, "does not accept alpha"),
    ({"objective": "min_recall", "space": {"objective": {"choice": ["gmean", "hmean"]}}}, "cannot be searched"),
    ({"objective": "min_recall", "space": {"lr": {"loguniform": [0.1, 1], "log": True}}}, "int only"),
    ({"objective": "min_recall", "space": {"method": {"choice": ["selmix", "erm"], "when": {"method": "erm"}}}},
     "conditional on itself"),
    ({"objective": "min_recall", "space": {"lr": {"uniform": [0.1, 1], "when": {"lambda_min": 0.6}},
                                           "lambda_min": {"uniform": [0.5, 0.9]}}}, "choice parameters only"),
    ({"objective": "min_recall", "space": {
        "method": {"choice": ["selmix", "erm"], "when": {"mixup": "feature"}},
        "mixup": {"choice": ["feature", "feature_soft"], "when": {"method": "erm"}}}}, "form a cycle"),
    ({"objective": "min_recall", "space": {"lr": 0.5}}, "belongs under 'fixed'"),
    ({"objective": "min_recall", "space": {"lr": {"uniform": [0.1, 1]}}, "fixed": {"lr": 0.5}},
     "both searched"),
    (["not", "a", "mapping"], "must be a mapping"),
])
def test_each_kind_of_problem_is_reported(raw, fragment):
    with pytest.raises(ConfigError) as info:
        load_space(raw)
    assert fragment in str(info.value)


def test_yaml_scientific_notation_and_missing_file(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("objective: gmean\nspace:\n  lr: {loguniform: [1e-2, 1e1]}\nfixed:\n  weight_decay: 5e-4\n")
    space = load_space(path)
    assert space.params[0].bounds == (0.01, 10.0) and space.fixed["weight_decay"] == 5e-4
    assert space.source == str(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_space(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("objective: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_space(tmp_path / "broken.yaml")
