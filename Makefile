# Developer and CI entry points. `make ci` is what .ci/run runs.
PYTHON_HOST ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# The CPU build of torch (the default index's Linux torch is a multi-GB CUDA build).
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu

.PHONY: install lint test docker-test ci

## install: the project venv with torch (CPU) and the dev tools
install:
	test -x $(PY) || $(PYTHON_HOST) -m venv $(VENV)
	$(PY) -c "import torch, sys; sys.exit(not torch.__version__.startswith('$(TORCH_VERSION)'))" 2>/dev/null \
		|| $(PY) -m pip install "torch==$(TORCH_VERSION)" --extra-index-url $(TORCH_INDEX_URL)
	$(PY) -m pip install -e ".[dev]"

## lint: ruff (lint + format) and mypy
lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

## test: the pytest suite
test:
	$(PY) -m pytest -q

## docker-test: build both images, run the compose stack and check it from outside (needs root or docker)
docker-test:
	.ci/docker-test.sh

ci: install lint test docker-test
