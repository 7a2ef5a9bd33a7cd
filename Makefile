# The two set-up commands of the README: `make demo` (main job on the embedded phantom) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
export NO_ALBUMENTATIONS_UPDATE=1
export PYTHONUNBUFFERED=1

.PHONY: env demo test test-learning test-fast export clean-nbs docs bench book
env:
	@bash tools/setup_env.sh

demo: env
	$(BIN)/echobook demo

test: env
	$(BIN)/python -m pytest tests -q -m "not learning" --durations=15

# the tiny-profile results (each model beats its baseline on the phantom): about 10 minutes on 2 cores
test-learning: env
	$(BIN)/python -m pytest tests -q -m learning --durations=10

test-fast: env
	$(BIN)/python -m pytest tests -q -m "not notebook and not learning"

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
