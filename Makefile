# appliance: `make run` serves the demo model on 127.0.0.1:3000; `make test` runs the whole suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 3000
DEMO_MODEL := var/models/demo.gguf
STAMP := $(VENV)/.installed
export APPLIANCE_CACHE ?= $(HOME)/.cache/appliance
# Quiet pip: the machine's extra local indexes print a warning per package.
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: run setup test test-unit test-integration demo-model lock clean

run: setup $(DEMO_MODEL)
	$(BIN)/appliance -p $(PORT) --model demo=$(DEMO_MODEL)

setup: $(STAMP)

# The llama-cpp-python wheel is compiled once from its pinned sdist and cached in $(APPLIANCE_CACHE).
$(STAMP): pyproject.toml requirements.lock scripts/llama-wheel.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --require-hashes --no-deps -r requirements.lock 2> >(grep -v 'is ignored' >&2)
	wheel=$$(PYTHON=$(BIN)/python scripts/llama-wheel.sh cpu) && $(PIP) install --no-deps --force-reinstall "$$wheel" 2> >(grep -v 'is ignored' >&2)
	$(PIP) install --no-deps --no-build-isolation -e . 2> >(grep -v 'is ignored' >&2)
	touch $@

demo-model: $(DEMO_MODEL)

$(DEMO_MODEL): | $(STAMP)
	mkdir -p $(dir $@)
	$(BIN)/python -m appliance.modelgen $@ --preset demo

test: setup
	$(BIN)/python -m pytest -ra

test-unit: setup
	$(BIN)/python -m pytest -ra tests/unit tests/contract

test-integration: setup
	$(BIN)/python -m pytest -ra tests/integration

# Re-pin every dependency with hashes (needs `uv`: pip install uv).
lock:
	uv pip compile requirements.in --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  --generate-hashes --no-header -o requirements.lock

clean:
	rm -rf $(VENV) var dist .pytest_cache
