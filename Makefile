# DPPMG — every target creates .venv on first use, so a fresh machine needs only Python 3.10+.
# GPU users: make setup TORCH_SPEC="torch==2.13.0+cu126" (any build your machine takes; installed before the rest).
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
CONFIG      ?= configs/default.yaml
ARGS        ?=
PY          := $(VENV)/bin/python
DPPMG       := $(VENV)/bin/dppmg
STAMP       := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-all lint format data stats stage1 stage2 bench bench-data bench-stage1 bench-stage2 clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned request would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

data: $(STAMP)
	$(DPPMG) data prepare $(CONFIG) $(ARGS)

stats: $(STAMP)
	$(DPPMG) data stats $(CONFIG) $(ARGS)

# Prepares the dataset first when it is missing (a no-op when it is up to date).
stage1: $(STAMP)
	$(DPPMG) stage1 $(CONFIG) $(ARGS)

# Needs stage 1's tokens for the same run_name; warm-starts the generators on first use (cached per dataset).
stage2: $(STAMP)
	$(DPPMG) stage2 $(CONFIG) $(ARGS)

bench: bench-data bench-stage1 bench-stage2

bench-data: $(STAMP)
	$(PY) benchmarks/bench_data.py $(ARGS)

bench-stage1: $(STAMP)
	$(PY) benchmarks/bench_stage1.py $(ARGS)

# About 20 minutes on 2 cores: stage 2 twice (cold generator cache, then cached).
bench-stage2: $(STAMP)
	$(PY) benchmarks/bench_stage2.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
