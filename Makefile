# Everything the README and CI run. `make train` and `make test` create .venv if missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install train test test-all bench lint clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

## Main job: DP-SGD on the built-in digits data (prints accuracy, epsilon, examples/s).
train: $(STAMP)
	$(VENV)/bin/jaxdp train --config configs/digits.py

## Test suite (fast, CPU only). Slow checks: `make test-all`.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

## Throughput per epsilon (quick grid): private vs non-private step, memory, accuracy, device scale-out.
## The older private / non-private / naive-loop table: $(PY) benchmarks/bench_core.py
bench: $(STAMP)
	$(VENV)/bin/jaxdp bench --quick

lint: $(STAMP)
	$(VENV)/bin/ruff check jaxdp tests benchmarks configs experiments
	$(VENV)/bin/ruff format --check jaxdp tests benchmarks configs experiments

clean:
	rm -rf runs .pytest_cache
