# `make run` and `make test` set up whatever is missing, then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
XGRAMMAR_VERSION ?= 0.2.9
ARGS ?=

.PHONY: run test test-fast lint bench setup clean

run: setup
	$(VENV)/bin/xllm up $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

setup: $(STAMP)

# torch goes in first and pinned, so nothing later pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@bash scripts/ensure-system-deps.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	# xgrammar without its triton requirement (GPU kernels only); pyproject lists the rest.
	$(PY) -m pip install --quiet --no-deps "xgrammar==$(XGRAMMAR_VERSION)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
