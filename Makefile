# Developer and CI entry points. The README's two commands are `make run` and `make test`;
# `.ci/run` runs `make test`.
PYTHON_HOST ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Optional extra index for torch, e.g. https://download.pytorch.org/whl/cpu for the small CPU build on a
# machine whose default index would give the multi-GB CUDA build. Empty: the default index (and any local
# wheels pip is configured with).
TORCH_INDEX_URL ?=
RUN_DIR ?= runs/default
TRAIN_ARGS ?= --data synthetic --max-minutes 5

.PHONY: install system-deps lint pytest docker-test test ci run train serve bench lock help

help:
	@grep -E '^## ' Makefile | sed 's/^## //'

## install: the project venv with torch (CPU wheel pinned) and the dev tools
install:
	test -x $(PY) || $(PYTHON_HOST) -m venv $(VENV)
	$(PY) -c "import torch, sys; sys.exit(not torch.__version__.startswith('$(TORCH_VERSION)'))" 2>/dev/null \
		|| $(PY) -m pip install "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"

## system-deps: Debian's chromium + chromedriver (browser tests) and nginx (proxy test) (root only; skipped otherwise)
system-deps:
	.ci/system-deps.sh

## lint: ruff (lint, security rules, format) and mypy
lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

## pytest: the Python test suite (unit, real uvicorn, headless browser)
pytest:
	$(PY) -m pytest -q

## docker-test: build both images, run the compose stack and check it from outside (needs root or docker)
docker-test:
	.ci/docker-test.sh

## test: everything CI checks: install, lint, pytest, docker
test: install system-deps lint pytest docker-test

ci: test

## train: train a model into $(RUN_DIR) (default: 5 minutes on the embedded synthetic cars) unless one is there
train: install
	$(PY) -m trainer $(TRAIN_ARGS) --out $(RUN_DIR) --if-missing

## run: the main job: install, train on the embedded synthetic cars (once), serve on http://127.0.0.1:8000
run: train
	CARVAE_CHECKPOINT=$(RUN_DIR)/model.safetensors $(PY) -m service

## bench: the benchmark (bench/README.md): limit, our service vs LitServe and plain FastAPI, training speed
BENCH_ARGS ?= --training
bench: install
	$(PY) -c "import litserve" 2>/dev/null || $(PY) -m pip install -q -c constraints.txt -e ".[bench]"
	$(PY) -m bench.run $(BENCH_ARGS)
	$(PY) -m bench.micro

## lock: re-resolve constraints.txt (the tested version of every dependency but torch) in a fresh venv
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON_HOST) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL))
	$(LOCK_VENV)/bin/python -m pip install -q -e ".[dev,bench]"
	{ sed -n '/^#/p' constraints.txt; $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable --all \
		| grep -viE '^(torch|pip|setuptools|wheel)=='; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt && rm -rf $(LOCK_VENV)
