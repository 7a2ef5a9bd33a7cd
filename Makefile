# The two set-up commands of the README: `make demo` (main job on the embedded phantom) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
export NO_ALBUMENTATIONS_UPDATE=1
export PYTHONUNBUFFERED=1

.PHONY: env demo test test-learning test-fast export clean-nbs docs bench
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

bench: env
	$(BIN)/echobook bench
