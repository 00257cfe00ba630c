# alignpipe developer workflow. `make demo` and `make test` set themselves up on a fresh machine.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# Where the CPU build of torch comes from when the configured package sources do not have it.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
DEMO_DIR ?= demo-output
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup test lint format demo compile bench clean

setup: $(VENV)/.installed

# Torch goes in first: on a machine without a GPU an unpinned torch would pull a multi-GB CUDA
# build as a dependency of the package. With a GPU, the package's own torch requirement decides.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/pip install --quiet "torch==$(TORCH_VERSION)+cpu" || \
	  $(BIN)/pip install --quiet "torch==$(TORCH_VERSION)+cpu" --index-url $(TORCH_CPU_INDEX); \
	fi
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: setup
	$(BIN)/python -m alignpipe.demo --output $(DEMO_DIR) $(DEMO_ARGS)

compile: setup
	$(BIN)/python -m pipelines compile --output compiled

# Counts come from BENCH_PAIRS, BENCH_WARMUP, BENCH_MEMORY_RUNS, BENCH_STEPS, BENCH_THREADS and
# BENCH_ONLY (e.g. `make bench BENCH_PAIRS=3`); results land in bench-output/dpo-<date>.json.
bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) $(DEMO_DIR) bench-output compiled kfp-local .pytest_cache .ruff_cache build dist src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
