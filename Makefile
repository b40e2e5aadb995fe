# make help lists the targets. Everything runs in a virtual environment (.venv by default).
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first, on its own: PyPI's default build (CUDA on Linux) serves a GPU. On a
# CPU-only machine a smaller build is:  make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install quickstart train test test-fast bench gpu-check clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-11s %s\n", $$1, $$2}'

$(PY):
	python3 -m venv $(VENV)

install: $(PY) ## create .venv and install the project with its test tools
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"

quickstart: install ## install, then train and test CAST on generated ListOps (minutes on a CPU)
	$(PY) train.py experiment=quickstart $(ARGS)

train: ## train with Hydra overrides: make train ARGS="task=listops attention=cast"
	$(PY) train.py $(ARGS)

test: install ## install, then run the whole test suite
	$(PY) -m pytest -q $(ARGS)

test-fast: ## the tests without end-to-end runs of train.py
	$(PY) -m pytest -q -m "not slow" $(ARGS)

bench: ## speed and memory against sequence length: make bench ARGS="--quick"
	$(PY) scripts/bench.py $(ARGS)

GPU_OUT ?= outputs/gpu-check
gpu-check: install ## on a CUDA machine, about 10 min: CUDA tests, lra/* presets, bench --targets; outputs/gpu-check/report.md
	@mkdir -p $(GPU_OUT)
	-GPU_CHECK_OUT=$(GPU_OUT) $(PY) -m pytest -q -m cuda -p no:cacheprovider tests/gpu 2>&1 | tee $(GPU_OUT)/tests.log
	-$(PY) scripts/bench.py --targets --device cuda --out $(GPU_OUT)/bench 2>&1 | tee $(GPU_OUT)/bench.log
	$(PY) -m cast.bench.gpu_check $(GPU_OUT)

clean: ## remove run outputs, caches and build leftovers (keeps data/ and .venv)
	rm -rf outputs/runs outputs/multirun .pytest_cache *.egg-info build
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +
