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

# Kubeflow: `make upload PIPELINE=dpo` uploads a new version (the git SHA unless VERSION=);
# `make run PIPELINE=dpo PARAMS=file.yaml [WAIT=1] [SERVICE_ACCOUNT=alignpipe-runner]` starts a
# run of the newest (or VERSION).
# The host is KFP_HOST, the token KFP_TOKEN; ALIGNPIPE_CLUSTER_CONFIG holds cluster settings.
PIPELINE ?= dpo
EXPERIMENT ?= alignpipe
WAIT_TIMEOUT ?= 21600
KFP_ARGS = $(if $(KFP_HOST),--host $(KFP_HOST)) $(if $(VERSION),--version $(VERSION))

.PHONY: upload run
upload: setup
	$(BIN)/python -m pipelines upload $(PIPELINE) $(KFP_ARGS)

run: setup
	@test -n "$(PARAMS)" || { echo "make run: set PARAMS=file.yaml (the run's arguments)" >&2; exit 2; }
	$(BIN)/python -m pipelines run $(PIPELINE) --experiment $(EXPERIMENT) --params $(PARAMS) \
	  $(KFP_ARGS) $(if $(WAIT),--wait --timeout $(WAIT_TIMEOUT)) \
	  $(if $(SERVICE_ACCOUNT),--service-account $(SERVICE_ACCOUNT))

# Images (images/), tagged with the package version. components/__init__.py derives the same
# names and reads ALIGNPIPE_IMAGE / ALIGNPIPE_GPU_IMAGE, exported here, so that
# `make images compile IMAGE_REGISTRY=registry.example.com/team` builds and references one tag.
PACKAGE_VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
IMAGE_REGISTRY ?= $(or $(ALIGNPIPE_IMAGE_REGISTRY),ghcr.io/alignpipe)
IMAGE_TAG ?= $(subst +,-,$(PACKAGE_VERSION))
export ALIGNPIPE_IMAGE ?= $(IMAGE_REGISTRY)/alignpipe:$(IMAGE_TAG)
export ALIGNPIPE_GPU_IMAGE ?= $(IMAGE_REGISTRY)/alignpipe-cuda:$(IMAGE_TAG)
MLFLOW_IMAGE ?= $(IMAGE_REGISTRY)/alignpipe-mlflow:$(IMAGE_TAG)
IMAGE_BUILD = docker build --build-arg ALIGNPIPE_VERSION=$(PACKAGE_VERSION)

.PHONY: images images-push
images:
	@command -v docker >/dev/null 2>&1 || { echo "make images: docker is not installed;" \
	  "build on a machine with Docker (the Dockerfiles are in images/)" >&2; exit 1; }
	@docker info >/dev/null 2>&1 || { echo "make images: docker is installed but reaches no" \
	  "Docker engine (docker info failed); start one, or build on a machine that has one" >&2; exit 1; }
	$(IMAGE_BUILD) -f images/Dockerfile -t $(ALIGNPIPE_IMAGE) .
	$(IMAGE_BUILD) -f images/Dockerfile.cuda -t $(ALIGNPIPE_GPU_IMAGE) .
	$(IMAGE_BUILD) -f images/Dockerfile.mlflow -t $(MLFLOW_IMAGE) .

images-push: images
	docker push $(ALIGNPIPE_IMAGE)
	docker push $(ALIGNPIPE_GPU_IMAGE)
	docker push $(MLFLOW_IMAGE)

# Counts come from BENCH_PAIRS, BENCH_WARMUP, BENCH_MEMORY_RUNS, BENCH_STEPS, BENCH_THREADS and
# BENCH_ONLY (e.g. `make bench BENCH_PAIRS=3`); results land in bench-output/bench-<date>.json.
bench: setup
	$(BIN)/python -m bench

# The real local stack (stack/): MLflow on PostgreSQL, artifacts in SeaweedFS S3, all on
# 127.0.0.1, state and logs in STACK_DIR. STACK_ARGS fixes ports (e.g. --mlflow-port 5000).
STACK_DIR ?= .stack
STACK_ARGS ?=

.PHONY: stack-up stack-down
stack-up: setup
	$(BIN)/python -m stack --dir $(STACK_DIR) up $(STACK_ARGS)

stack-down:
	test ! -x $(BIN)/python || $(BIN)/python -m stack --dir $(STACK_DIR) down

clean:
	rm -rf $(VENV) $(DEMO_DIR) bench-output compiled kfp-local .pytest_cache .ruff_cache build dist src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
