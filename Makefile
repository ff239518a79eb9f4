# One test command (`make test`, which .ci/run calls) and one way to start the server.
# The virtual environment is reused when present; pip keeps its wheel cache, so the
# llama-cpp-python compile (~6 min on 2 cores) happens once per machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PYTEST_ARGS ?=

.PHONY: serve test contracts lint install dev bench clean-cache

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PIP) install -e '.[dev]'
	touch $@ $(VENV)/.installed

$(VENV)/.installed-bench: pyproject.toml | $(PY)
	$(PIP) install -e '.[bench]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

serve: $(VENV)/.installed
	$(VENV)/bin/qwen3-moe-serve $(ARGS)

test: $(VENV)/.installed-dev
	$(PY) -m pytest $(PYTEST_ARGS)
	$(MAKE) --no-print-directory lint

# Discharge the contracts: every test bound to a falsifier (pytest -m falsifies), on the real
# model named by QWEN3_MOE_GGUF_PATH when it is set (its tests skip, recorded SKIPPED, when not).
contracts: $(VENV)/.installed-dev
	@echo "real model: $${QWEN3_MOE_GGUF_PATH:-none (QWEN3_MOE_GGUF_PATH is not set)}"
	$(PY) -m pytest -m falsifies $(PYTEST_ARGS); status=$$?; \
	echo "findings: $${QWEN3_MOE_FINDINGS:-$(CURDIR)/findings.json}"; exit $$status

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check app tests bench
	$(PY) -m ruff format --check app tests bench
	$(PY) -m mypy app bench tests

# This server against llama-cpp-python's bundled server and llama.cpp's llama-server (when a
# binary is found) on the same model, then the many-streams scenario on the tiny model (1 to
# 64 streams against --parallel 64 and llama-server -np 64, with the batched engine floor):
# results, tables and plots in bench/results/ (see README, Performance). Flags through ARGS,
# e.g. ARGS="--models /models/x.gguf --llama-server PATH", and MANY_STREAMS_ARGS.
# Then many agent conversations on 4 slots against llama-server (one system prompt shared by
# all, then one each) and conversations on nginx-balanced replicas (needs nginx). Last, an
# editor's fill-in-the-middle session (llama.vim's /infill requests) against llama-server
# --cache-reuse 256; EDITING_ARGS, e.g. EDITING_ARGS="--positions 24 --model bench".
MANY_STREAMS_ARGS ?=
CONVERSATIONS_ARGS ?= --long 8192,32768
REPLICAS_ARGS ?=
EDITING_ARGS ?=
bench: $(VENV)/.installed-bench
	$(PY) -m bench $(ARGS)
	$(PY) -m bench.many_streams $(MANY_STREAMS_ARGS)
	$(PY) -m bench.conversations $(CONVERSATIONS_ARGS)
	$(PY) -m bench.conversations --distinct-systems $(CONVERSATIONS_ARGS)
	$(PY) -m bench.replicas $(REPLICAS_ARGS)
	$(PY) -m bench.editing $(EDITING_ARGS)
