#!/usr/bin/env python
"""The command line from a checkout: `python run_search.py ...` is `selmix-ray ...` (selmix_ray/cli.py).

Kept free of third-party imports so that, run with a Python that lacks the dependencies, it says in one
line how to set up instead of printing a traceback.
"""

import sys


def _missing_dependency(error: ModuleNotFoundError) -> int:
    print(f"run_search.py: the Python at {sys.executable} lacks the package {error.name!r}. Set up once with "
          "`make demo` (creates .venv and runs the default job), then run `.venv/bin/python run_search.py ...`.",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    try:
        from selmix_ray.cli import main

        sys.exit(main())
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] == "selmix_ray" and "selmix_ray" in sys.modules:
            raise  # a module missing inside the package is a bug, not a set-up problem
        sys.exit(_missing_dependency(error))
