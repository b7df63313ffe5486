# Setup-free entry points: each target creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo pool-demo test bench lint typecheck clean

$(STAMP): pyproject.toml scripts/bootstrap.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/bootstrap.sh
	touch $@

demo: $(STAMP)  ## the main job: memserve through every MemServe design stage (same greedy tokens in each)
	$(BIN)/python -m memserve

pool-demo: $(STAMP)  ## a short tour of the MemPool API
	$(BIN)/python examples/pool_demo.py

# Two workers, a whole test file each (a file's module fixtures, such as its cluster, start once):
# most tests wait on other processes (instances, peers, deadlines) for part of their time, so on
# a 2-core machine two files at a time take ~40% less wall time than one (docs/reliability.md).
# A test still running after 300 s fails with its stack (the slowest takes ~80 s on 2 slow cores).
test: $(STAMP)  ## the test suite (what CI runs)
	$(BIN)/python -m pytest -n 2 --dist loadfile --timeout 300

bench: $(STAMP)  ## API benchmarks against baselines, with ratio tables
	$(BIN)/python -m pytest benchmarks --benchmark-enable -q -s

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .benchmarks
