# Quick start targets. Both create (or reuse) the virtual environment at .venv.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean-venv

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)  ## run the default job
	RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled $(VENV)/bin/python run_search.py

test: $(STAMP)  ## run the whole test suite, slow tests included
	$(VENV)/bin/python -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
