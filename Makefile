# meshware's two front doors: `make demo` (the sample mesh) and `make test` (everything CI runs).
# Both create .venv and install what they need; nothing has to be installed by hand.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-stop test lint typecheck unit docs wheel-check system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench,fastapi,flask,django]'
	touch $(STAMP)

system-deps:
	@bash scripts/system-deps.sh

# The sample shop mesh: ARGS="--duration 60 --keep-running" to look at the dashboard longer.
demo: $(STAMP)
	$(BIN)/python -m sample_services.shop $(ARGS)

# Stops every process `make demo ARGS=--keep-running` left (the pid file in .meshware/shop/).
demo-stop:
	$(BIN)/python -m sample_services.shop stop

test: $(STAMP) system-deps lint typecheck unit docs wheel-check

lint: $(STAMP)
	$(BIN)/ruff check meshware plugins sample_services tests bench
	$(BIN)/ruff format --check meshware plugins sample_services tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

docs: $(STAMP)
	$(BIN)/mkdocs build --strict --quiet --site-dir $(VENV)/site

# Every benchmark, then docs/benchmarks.md and docs/img/ rewritten from that run (on a quiet
# machine: the figures are only as good as the machine is idle). bench-quick: a smoke run of the
# same harness in under a minute that writes nothing.
# The long reliability scenarios (faults, load, rotation, drain, Redis outage); --write puts
# their figures in docs/reliability.md. The fast reliability suites run in `make unit`.
.PHONY: soak
soak: $(STAMP) system-deps
	$(BIN)/python -m tests.reliability.soak --write

.PHONY: bench bench-quick
bench: $(STAMP) system-deps
	$(BIN)/python -m bench.run_all

bench-quick: $(STAMP) system-deps
	$(BIN)/python -m bench.run_all --quick --no-write

wheel-check: $(STAMP)
	@bash scripts/wheel-check.sh $(BIN)/python

clean:
	rm -rf $(VENV) dist build site .pytest_cache .mypy_cache .ruff_cache
