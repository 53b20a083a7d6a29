# The two set-up commands of the README: `make quickstart` and `make test`.
# Both create .venv (Python 3.11) and install this project into it in editable mode.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-test quickstart test lint wheel

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# --no-compile: pip would byte-compile all ~24k modules of the environment (about 160 s on 2 cores);
# Python compiles the ones a run imports, once, on first import.
install: $(BIN)/python
	$(BIN)/python -m pip install --quiet --no-compile torch==2.13.0
	$(BIN)/python -m pip install --quiet --no-compile -e .

install-test: $(BIN)/python
	$(BIN)/python -m pip install --quiet --no-compile torch==2.13.0
	$(BIN)/python -m pip install --quiet --no-compile -e ".[test]"

quickstart: install
	$(BIN)/lmdm quickstart

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# pytest exits 5 when it collects no test: make treats that as a failure, as it should.
test: install-test lint
	$(BIN)/python -m pytest

# The wheel that `ray job submit --runtime-env infra/runtime_env.yaml` ships (README, "Running on a cluster").
wheel: $(BIN)/python
	$(BIN)/python -m pip install --quiet build
	rm -rf dist && $(BIN)/python -m build --wheel --outdir dist .
