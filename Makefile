# Two entry points for a fresh machine: `make demo` (the main job on the bundled corpus) and
# `make test`. Both create .venv and install the project with its test extras on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_RUN ?= runs/demo

.PHONY: venv vllm-venv demo test test-fast test-assets test-main test-vllm lint format slurm-up slurm-down clean bench

SLURM_NODES ?= 3

# uv (from PyPI, into .cache/uv) creates and fills the venvs: ~25 s for .venv against ~110 s with pip.
# It does not read pip's configuration, so pip's find-links (where a machine keeps wheels such as a CPU
# build of torch) are handed on; --seed puts pip in the venv for the tools that call it.
# --compile-bytecode: uv, unlike pip, writes no .pyc files by default, and where PYTHONDONTWRITEBYTECODE is
# set (as on these machines) every new interpreter then compiles torch, transformers and megatron-core from source
# again: ~5 s of CPU for each training rank, CLI call or Slurm task that imports them.
UV_VERSION ?= 0.13.9
UV := .cache/uv/bin/uv
FIND_LINKS := $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
ifneq ($(FIND_LINKS),)
export UV_FIND_LINKS ?= $(FIND_LINKS)
endif

venv: $(STAMP)

$(UV):
	$(PYTHON) -m pip install --quiet --target .cache/uv "uv==$(UV_VERSION)"

$(STAMP): pyproject.toml Makefile | $(UV)
	test -x $(PY) || $(UV) venv --quiet --seed --python $(PYTHON) $(VENV)
	$(UV) pip install --quiet --compile-bytecode --python $(PY) -e '.[test]'
	touch $(STAMP)

# the whole chain on the bundled corpus: shard -> synthesize -> templify -> tokenize -> mixture ->
# train -> export -> eval -> report (local executor; add EXECUTOR=slurm with tools/local-slurm up)
EXECUTOR ?= local
demo: venv
	$(PY) -m ipt_hpc.launch pipeline --config configs/demo.yaml --run $(DEMO_RUN) --executor $(EXECUTOR)

# the whole suite: the main venv, then the vLLM tests in their own venv (vLLM's CPU build pins its own
# torch and transformers; tools/make-vllm-venv builds it on first use, ~3 minutes and ~4 GB)
test: test-main test-vllm

# registry-only test assets (Mistral-7B-v0.1's SentencePiece model from PyPI's mistral-common wheel)
test-assets: venv
	tools/fetch-test-assets $(PY)

# pytest-xdist: PYTEST_WORKERS processes; each test module on one worker, the Slurm tests together on one
# (tests/conftest.py); PYTEST_WORKERS=0 runs in this process
PYTEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadgroup)
# one OpenMP thread per process in the tests (torchrun's own default for several ranks): the workers and their
# training ranks, CLI runs and Slurm tasks already keep every core busy, and a second thread per process then
# only waits at OpenMP's barriers, spinning on a core another process needs. Set it to override.
test-main test-fast: export OMP_NUM_THREADS ?= 1

test-main: venv test-assets
	$(PY) -m pytest -m "not vllm" $(XDIST) $(PYTEST_ARGS)

# the edit-test loop: no Slurm, vLLM, training run or slow test (a few minutes on 2 cores)
test-fast: venv test-assets
	$(PY) -m pytest -m "not slurm and not vllm and not train and not slow and not gpu" $(XDIST) $(PYTEST_ARGS)

vllm-venv: | $(UV)
	UV=$(UV) tools/make-vllm-venv

test-vllm: vllm-venv
	.venv-vllm/bin/python -m pytest -m vllm tests/test_vllm.py $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

slurm-up:  # the host's node, and SLURM_NODES namespaced nodes for the multi-node tests (as CI)
	tools/local-slurm up --nodes $(SLURM_NODES)

slurm-down:
	tools/local-slurm down

bench: venv
	$(PY) tools/bench_records.py --mb 100

clean:
	rm -rf $(VENV) .venv-vllm runs .cache/test-assets .cache/uv .pytest_cache .ruff_cache *.egg-info
