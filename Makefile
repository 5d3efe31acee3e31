# Two commands do all the set-up: `make run` (the app on the builtin demo) and `make test`.
# Both create or reuse .venv and install what the project needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tunedeck-installed
# On Linux PyPI's torch wheel is a CUDA build; where a CPU wheel lies in pip's find-links it is taken.
TORCH_SPEC ?= torch==2.13.0

.PHONY: run train test lint bench desktop-install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# On Linux, tunedeck first checks the system libraries Qt's xcb plugin needs: a missing one is named
# in one line with the apt-get command that installs it, and make stops there (exit 2).
run: $(STAMP)
	$(VENV)/bin/tunedeck $(ARGS)

train: $(STAMP)
	$(VENV)/bin/tunedeck-train $(ARGS)

test: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q $(ARGS)

# ruff (lint and format), mypy on the engine, import-linter's layer contracts. mypy and import-linter
# read a copy of the package laid out as it installs (tunedeck/engine, tunedeck/gui, ...): the folders
# are mapped by pyproject's package-dir, which neither tool follows. mypy's paths are mapped back.
LINT_TREE := build/lint
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	rm -rf $(LINT_TREE) && mkdir -p $(LINT_TREE)/tunedeck
	cp tunedeck/*.py $(LINT_TREE)/tunedeck/ && cp -r engine gui resources $(LINT_TREE)/tunedeck/
	set -o pipefail; MYPYPATH=$(LINT_TREE) $(VENV)/bin/mypy | sed 's#^$(LINT_TREE)/tunedeck/##'
	cd $(LINT_TREE) && ../../$(VENV)/bin/lint-imports --no-cache ../../pyproject.toml

bench: $(STAMP)
	$(PY) -m bench.vs_trainer $(ARGS)

desktop-install: $(STAMP)
	$(PY) -m tunedeck.gui.desktop_install

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
