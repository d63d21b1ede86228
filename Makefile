# One entry point for humans and CI.  `make run` serves the example rulesets on the embedded
# default (no Redis) and feeds them sample events; `make test` installs what the tests need
# (including redis-server when it is missing and can be installed) and runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench bench-compare bench-instructions lint install redis-server clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/krules run rulesets.orders rulesets.sensors rulesets.retries rulesets.loops --demo

redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing redis-server (Debian package)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else \
	    echo "redis-server is missing and cannot be installed here; real-Redis tests will skip (and fail under CI=true)"; \
	  fi; }

test: $(STAMP) redis-server
	$(BIN)/python -m pytest

bench: $(STAMP) redis-server
	$(BIN)/python -m bench

.venv-krules/bin/python:
	$(PYTHON) -m venv .venv-krules
	.venv-krules/bin/python -m pip install --quiet 'krules-framework==3.3.0'

# Side-by-side with KRules 3.3 (installed from PyPI into its own virtual environment): alternating
# wall-clock runs, then instruction counts under valgrind (deterministic on a noisy machine).
bench-compare: $(STAMP) .venv-krules/bin/python
	$(BIN)/python -m bench.compare
	@command -v valgrind >/dev/null 2>&1 && $(BIN)/python -m bench.instructions || echo "valgrind missing: instruction counts skipped"
	@command -v valgrind >/dev/null 2>&1 && $(BIN)/python -m bench.default_chain --instructions || true

# ruff (lint and format), mypy strict, and the import-linter contracts of pyproject.toml (the layers)
# Instructions per order under callgrind (the figure that survives a noisy machine): the memory
# cascade, the default chain, and a Redis-mode drain of prefilled streams.
bench-instructions: $(STAMP) redis-server
	$(BIN)/python -m bench.instructions
	$(BIN)/python -m bench.default_chain --instructions
	$(BIN)/python -m bench.stream_instructions

lint: $(STAMP)
	$(BIN)/ruff check krules storage middleware rulesets tests bench
	$(BIN)/ruff format --check krules storage middleware rulesets tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) build dist *.egg-info
