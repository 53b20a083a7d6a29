# The two set-up commands of the README: `make quickstart` and `make test`.
# Both create .venv (Python 3.11) and install this project into it in editable mode.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-test quickstart test lint wheel gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Modules are byte-compiled at install (pip's default), not left to each process: with
# PYTHONDONTWRITEBYTECODE=1 (set on some machines) every Ray worker would recompile what it imports.
install: $(BIN)/python
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e .

install-test: $(BIN)/python
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"

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

# For anyone with a GPU, one command (under 5 minutes on one H100-class GPU): the gpu-marked tests (among
# them a few LMDM training steps through Ray Train with nccl and bf16, then a stream from that checkpoint), then
# `lmdm bench stream` at Stable Audio Open Small's size (width 1024, depth 16, the paper's geometry) in
# bf16 on the compile runtime beside eager. CI cannot run it (no GPU); it is dry-run on CPU with a tiny shape:
#   make gpu-check GPU_DEVICE=cpu GPU_BENCH="--quick --width 64 --depth 1 --block-frames 4 --steps 2 --repeats 2"
GPU_DEVICE ?= cuda
GPU_BENCH ?= --width 1024 --depth 16 --dtype bfloat16 --runtime compile --runtime eager --repeats 20
gpu-check: install-test
	$(BIN)/python -m pytest -m gpu -p no:cacheprovider -q
	$(BIN)/lmdm bench stream --device $(GPU_DEVICE) $(GPU_BENCH) --json runs/gpu-check.json
