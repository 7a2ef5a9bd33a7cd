# The two set-up commands of the README: `make demo` (main job on the embedded phantom) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
export NO_ALBUMENTATIONS_UPDATE=1
export PYTHONUNBUFFERED=1

.PHONY: env demo test test-learning test-heavy test-fast export clean-nbs docs bench book gpu-check
env:
	@bash tools/setup_env.sh

demo: env
	$(BIN)/echobook demo

# two pytest workers (pytest-xdist): the suite is mostly single-threaded notebook kernels, so both cores stay busy
TEST_WORKERS ?= 2
test: env
	$(BIN)/python -m pytest tests -q -m "not learning and not heavy" -n $(TEST_WORKERS) --dist worksteal --durations=15

# the tiny-profile results (each model beats its baseline on the phantom): about 10 minutes on 2 cores
test-learning: env
	$(BIN)/python -m pytest tests -q -m learning --durations=10

# whole tutorials re-executed in fresh processes (tens of minutes on 2 cores)
test-heavy: env
	$(BIN)/python -m pytest tests -q -m heavy --durations=10

test-fast: env
	$(BIN)/python -m pytest tests -q -m "not notebook and not learning and not heavy" -n $(TEST_WORKERS)

export: env
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean

docs: env
	$(BIN)/echobook docs --preview

# the book: every table's tiny reproduction (finished runs reused, interrupted ones resumed), the results pages and
# the landing page executed with their outputs, then the site (Quarto via nbdev_docs) or the offline preview.
# `make book TABLES="table4 fig2"` reproduces only those tables (every page is still executed).
TABLES ?=
book: env
	$(BIN)/python -c "from echobook.docs import build_book; raise SystemExit(build_book('$(TABLES)'.split() or None))"

bench: env
	$(BIN)/echobook bench

# one prepared GPU check (bench on CUDA, memory vs k at batch 20, the table3 smoke) into bench/gpu-check/report.md;
# without a GPU: `make gpu-check GPU_CHECK="--device cpu --reduced"` (small sizes; a test runs it)
GPU_CHECK ?=
gpu-check: env
	$(BIN)/echobook gpu-check $(GPU_CHECK)
