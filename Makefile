# Two entry points for a fresh machine: `make demo` (the main job on the bundled corpus) and
# `make test`. Both create .venv and install the project with its test extras on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_RUN ?= runs/demo

.PHONY: venv vllm-venv demo test test-assets test-main test-vllm lint format slurm-up slurm-down clean bench

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
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

test-main: venv test-assets
	$(PY) -m pytest -m "not vllm" $(PYTEST_ARGS)

vllm-venv:
	tools/make-vllm-venv

test-vllm: vllm-venv
	.venv-vllm/bin/python -m pytest -m vllm tests/test_vllm.py $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

slurm-up:
	tools/local-slurm up

slurm-down:
	tools/local-slurm down

bench: venv
	$(PY) tools/bench_records.py --mb 100

clean:
	rm -rf $(VENV) .venv-vllm runs .cache/test-assets .pytest_cache .ruff_cache *.egg-info
