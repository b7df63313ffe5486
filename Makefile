# Setup-free entry points: each target creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo pool-demo test bench lint typecheck clean

$(STAMP): pyproject.toml scripts/bootstrap.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/bootstrap.sh
	touch $@

demo: $(STAMP)  ## the main job: the memserve engine demo (multi-turn chats, caching off vs on)
	$(BIN)/python -m memserve

pool-demo: $(STAMP)  ## a short tour of the MemPool API
	$(BIN)/python examples/pool_demo.py

test: $(STAMP)  ## the test suite (what CI runs)
	$(BIN)/python -m pytest

bench: $(STAMP)  ## API benchmarks against baselines, with ratio tables
	$(BIN)/python -m pytest benchmarks --benchmark-enable -q -s

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .benchmarks
