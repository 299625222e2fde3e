"""selmix-ray: hyperparameter search for SelMix fine-tuning on Ray Tune + Optuna.

The public API is imported lazily (module-level ``__getattr__``): ``import selmix_ray`` imports nothing
heavy, sets no environment variable, starts no Ray and touches no GPU, and ``selmix_ray.engine`` (the
training loop) needs numpy, torch and scipy only.

    from selmix_ray import FinetuneConfig, build_features, finetune, search, resume, load_run, compare

``finetune`` and ``search`` are functions; their modules are ``selmix_ray.engine`` and
``selmix_ray.sweep`` (named apart from the functions, so that importing a module never hides a function).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {  # public name -> submodule that defines it
    "build_features": "features",
    "FinetuneConfig": "config",
    "finetune": "engine",
    "search": "sweep",
    "resume": "sweep",
    "load_run": "results",
    "compare": "comparison",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'selmix_ray' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
