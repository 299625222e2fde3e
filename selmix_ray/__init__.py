"""selmix-ray: hyperparameter search for SelMix fine-tuning on Ray Tune + Optuna.

The public API is imported lazily (module-level ``__getattr__``): ``import selmix_ray`` imports nothing
heavy, sets no environment variable, starts no Ray and touches no GPU, and ``import selmix_ray.finetune``
needs numpy, torch and scipy only.

    from selmix_ray import build_features, search, load_run, compare
"""

from __future__ import annotations

import importlib
import types

__version__ = "0.1.0"

_EXPORTS = {  # public name -> submodule that defines it
    "build_features": "features",
    "FinetuneConfig": "finetune",
    "finetune": "finetune",
    "search": "search",
    "resume": "search",
    "load_run": "results",
    "compare": "results",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'selmix_ray' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    # `finetune` is both a submodule and a function: the function wins once asked for by name.
    globals()[name] = value
    return value


class _CallableModule(types.ModuleType):
    """A submodule that shares its name with its main function, and calls that function when called.

    ``selmix_ray.finetune`` and ``selmix_ray.search`` are both submodules (``import selmix_ray.finetune``)
    and functions (``selmix_ray.finetune(features, config)``). Python's import system rebinds the package
    attribute to the submodule whenever that submodule is first imported, so which of the two a user gets
    would depend on import order. Those two modules set this class on themselves, and then
    ``selmix_ray.finetune(...)`` and ``selmix_ray.search(...)`` work in every case.
    """

    def __call__(self, *args, **kwargs):
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
