# Everything the README and CI run. `make train` and `make test` create .venv if missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install train test test-slow test-all bench bench-gpu lint clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

## Main job: DP-SGD on the built-in digits data (prints accuracy, epsilon, examples/s). It is a demo: a second
## `make train` replaces runs/digits (--overwrite); jaxdp train itself refuses to write over a run.
train: $(STAMP)
	$(VENV)/bin/jaxdp train --config configs/digits.py --overwrite

## Test suite (CPU only, two workers). The privacy contract tests are all in it (bounds, loop references, noise
## statistics, accountant values, masking, sharded == unsharded on the MLP, key entropy). The tests compile far
## more than they compute, so XLA's CPU backend runs at optimisation level 0 here (~30% faster to compile; the
## same computations, fused differently: that is how the float16 rounding of jaxdp.clipping.core.rounding_slack
## was found). CI then runs `make test-slow`, which also repeats the clipping, ghost and step tests at the
## default level.
TEST_XLA_FLAGS := --xla_backend_optimization_level=0
test: $(STAMP)
	XLA_FLAGS="$(TEST_XLA_FLAGS) $$XLA_FLAGS" $(PY) -m pytest -q -m "not slow" -n 2 --dist loadgroup

## The long checks (recipe and table smokes, 8-device CNN, multi-host comparisons), then the clipping, ghost and
## step tests at XLA's default optimisation level: CI's second step.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow -n 2 --dist loadgroup
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadgroup tests/test_clipping.py tests/test_ghost.py tests/test_step.py

test-all: $(STAMP)
	XLA_FLAGS="$(TEST_XLA_FLAGS) $$XLA_FLAGS" $(PY) -m pytest -q -n 2 --dist loadgroup

## Throughput per epsilon (quick grid): private vs non-private step, memory, accuracy, device scale-out.
## The older private / non-private / naive-loop table: $(PY) benchmarks/bench_core.py
bench: $(STAMP)
	$(VENV)/bin/jaxdp bench --quick

## The accelerator suite, on a machine with a GPU or TPU: WRN-16-4 and the transformer at batch 1024, private /
## non-private, memory and examples/s per epsilon, in float32 and bfloat16 (jaxdp bench --accelerator).
bench-gpu: $(STAMP)
	$(VENV)/bin/jaxdp bench --accelerator --no-progress

lint: $(STAMP)
	$(VENV)/bin/ruff check jaxdp tests benchmarks configs experiments
	$(VENV)/bin/ruff format --check jaxdp tests benchmarks configs experiments

clean:
	rm -rf runs .pytest_cache
