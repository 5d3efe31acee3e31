# Two commands do all the set-up: `make run` (the app on the builtin demo) and `make test`.
# Both create or reuse .venv and install what the project needs.
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

run: $(STAMP)
	$(VENV)/bin/tunedeck $(ARGS)

train: $(STAMP)
	$(VENV)/bin/tunedeck-train $(ARGS)

test: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check engine gui tests bench

bench: $(STAMP)
	$(PY) -m bench.vs_trainer $(ARGS)

desktop-install: $(STAMP)
	$(PY) -m tunedeck.gui.desktop_install

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
