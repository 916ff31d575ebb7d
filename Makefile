# Two commands: `make test` and `make bench` (plus `make cuda-check` where nvcc is installed). Each sets itself up from a fresh clone:
# it uses the active virtual environment (or conda env) if there is one, else creates
# .venv (seeing system packages, so a preinstalled CUDA torch is used as is), installs
# torch==2.13.0 (CPU build) only when no torch is importable, then this project.
SHELL := /bin/bash
ifneq ($(VIRTUAL_ENV)$(CONDA_PREFIX),)
PYTHON := python
else
PYTHON := .venv/bin/python
endif
TORCH_PIN ?= torch==2.13.0
COMPAT_LIBS ?= open_clip_torch==3.3.0 lightly==1.6.0
PYTEST_ARGS ?=

.PHONY: setup test test-quick bench bench-quick info cuda-check gpu-wheels gpu-rehearsal clean

$(PYTHON):
	python3 -m venv --system-site-packages .venv

setup: $(PYTHON)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_PIN)"
	$(PYTHON) -m pip install --no-build-isolation -e ".[test,bench]"
	@# open_clip and lightly would pull another torch: their wheels go, without dependencies, into .compat_libs/,
	@# from which tests/test_compat.py loads only their loss modules (skipped, with the reason, where absent).
	@test -d .compat_libs/lightly -a -d .compat_libs/open_clip || $(PYTHON) -m pip install -q --no-deps \
		--target .compat_libs $(COMPAT_LIBS) || echo "warning: $(COMPAT_LIBS) not installed: test_compat skips them"

test: setup
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

# The suite without the cases marked slow (CI runs them all).
test-quick: setup
	$(PYTHON) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PYTHON) bench/run.py

bench-quick: setup
	$(PYTHON) bench/run.py --quick

# Compiles every csrc/*.cu for sm_80 and sm_90a with nvcc (no GPU needed), checks the bindings against
# torch's headers, and prints registers, spills and the SASS instruction mix per kernel.
cuda-check: setup
	$(PYTHON) bench/cuda_resources.py

# The GPU suite (bench/gpu_suite.sh: its header has the exact call for a lent GPU machine). gpu-wheels
# fetches the two packages its CLIP headline compares with into .whl/, which that call carries;
# gpu-rehearsal runs the suite on CPU as CI does (tests/test_gpu_suite.py).
gpu-wheels:
	$(PYTHON) -m pip download --no-deps --only-binary=:all: -d .whl inf-cl==1.2.1 memeff==0.3.1

gpu-rehearsal: setup
	REHEARSAL=1 PYTHON=$(PYTHON) bash bench/gpu_suite.sh bench/results/gpu_rehearsal

info: setup
	$(PYTHON) -m fused_contrastive.info

clean:
	rm -rf .venv .compat_libs build *.egg-info python/*.egg-info .pytest_cache
