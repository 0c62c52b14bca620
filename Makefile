# Two commands for a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cl-fed-installed

.PHONY: install demo test test-fast lint bench clean-cache

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m simulations.demo

test: $(STAMP)  # everything, what CI runs: unit, in-process and real Flower processes
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15  # 2 workers; longest files first (tests/conftest.py)

test-fast: $(STAMP)  # unit and in-process tests, no real Flower processes (marker `slow` deselected)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) -m benchmarks.synthesis

clean-cache:
	rm -rf .cache
