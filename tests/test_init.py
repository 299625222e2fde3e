"""The package's import-time contract: lazy re-exports, no env vars, no Ray/Optuna/pyarrow for finetune."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import selmix_ray


def _run(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (nothing imported yet) and return the JSON it prints."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_finetune_loads_no_ray_optuna_or_pyarrow():
    out = _run(
        "import json, sys\n"
        "import selmix_ray.engine\n"
        "heavy = ('ray', 'optuna', 'pyarrow', 'pandas', 'matplotlib')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    assert out == []


def test_import_selmix_ray_sets_no_env_var_and_imports_nothing_heavy():
    out = _run(
        "import json, os, sys\n"
        "before = dict(os.environ)\n"
        "import selmix_ray\n"
        "after = dict(os.environ)\n"
        "changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))\n"
        "heavy = sorted(m for m in ('ray', 'optuna', 'pyarrow', 'torch') if m in sys.modules)\n"
        "print(json.dumps({'changed': changed, 'heavy': heavy}))\n"
    )
    assert out == {"changed": [], "heavy": []}


def test_lazy_exports_resolve_to_the_public_api():
    out = _run(
        "import json\n"
        "from selmix_ray import finetune, FinetuneConfig, load_run, compare, build_features\n"
        "print(json.dumps([callable(finetune), finetune.__module__, FinetuneConfig.__name__,\n"
        "                  load_run.__module__, compare.__module__, build_features.__module__]))\n"
    )
    assert out == [True, "selmix_ray.engine", "FinetuneConfig", "selmix_ray.results", "selmix_ray.comparison",
                   "selmix_ray.features"]


def test_all_and_version():
    assert set(selmix_ray.__all__) >= {"build_features", "FinetuneConfig", "finetune", "search", "resume",
                                       "load_run", "compare", "__version__"}
    assert isinstance(selmix_ray.__version__, str) and selmix_ray.__version__
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        selmix_ray.nope  # noqa: B018


def test_search_is_callable_whatever_the_import_order():
    # The modules are named apart from the functions, so importing them first hides nothing.
    code = (
        "import selmix_ray.sweep, selmix_ray.engine, selmix_ray\n"
        "print(selmix_ray.search.__module__, selmix_ray.finetune.__module__)\n"
        "try:\n"
        "    selmix_ray.search('no-such-space.yaml', features=None, storage='/tmp', name='x', num_samples=1)\n"
        "except Exception as error:\n"
        "    print(type(error).__name__, error)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = out.stdout.splitlines()
    assert lines[0] == "selmix_ray.sweep selmix_ray.engine", out.stdout + out.stderr
    assert lines[1].split(" ")[0] in {"ConfigError", "DataError", "ExperimentError"}, out.stdout + out.stderr


def test_finetune_is_callable_after_importing_the_submodule():
    import selmix_ray.engine as module

    assert callable(selmix_ray.finetune) and module.finetune is selmix_ray.finetune
    with pytest.raises(TypeError):
        selmix_ray.finetune()  # reaches the function, which needs features and a config


def test_finetune_config_documents_every_field():
    import dataclasses

    from selmix_ray.config import FinetuneConfig

    doc = FinetuneConfig.__doc__
    missing = [f.name for f in dataclasses.fields(FinetuneConfig) if f"\n        {f.name}: " not in doc]
    assert missing == [], f"FinetuneConfig's docstring does not explain {missing}"
