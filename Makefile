# Two entry points: `make run` (the whole method on the embedded default) and `make test`.
# Both create or update the virtual environment first. Nothing here reaches the network
# beyond the package index; Kedro's telemetry is off.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export KEDRO_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
# DeepSpeed picks its accelerator by probing; on a machine without a GPU tell it plainly.
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)

.PHONY: install run test test-fast lint viz bench gpu-check clean-data

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/kedro run $(ARGS)

# Two workers (CI has two cores), whole modules to a worker, in the order tests/conftest.py
# gives them (the longest first: the end-to-end run keeps one worker while the other takes the
# other long modules); xdist's own order (most tests first) would start the longest module last.
PYTEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadscope --no-loadscope-reorder

test: lint
	$(PYTEST) $(ARGS)

test-fast: lint
	$(PYTEST) -m "not slow" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

viz: $(STAMP)
	$(BIN)/kedro viz build --include-previews

# The real-scale path on this machine's GPUs (CPU: its tiny fallback, as CI runs it).
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py $(ARGS)

bench: $(STAMP)  # the benchmark scripts only (their helpers live in bench/lib/)
	for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean-data:
	find data -type f ! -name .gitkeep -delete
