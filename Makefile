# Every target bootstraps .venv on a fresh machine: the stamp file is rebuilt whenever
# pyproject.toml changes, so `make test` and `make serve` are the only commands a newcomer needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# `make serve` installs only what serving needs (seconds, not the test toolchain's minutes).
SERVE_STAMP := $(VENV)/.serve-installed
# Two workers, each file on one worker (module fixtures stay whole): most of the suite waits
# on real servers and processes, so two workers on two cores halve its wall clock.
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?=

CHAOS_ARGS ?= --payments 90000 --concurrency 32

.PHONY: help install serve test lint fmt bench chaos clean

help:
	@echo "make serve   set up .venv and run the payments service on SQLite"
	@echo "make test    set up .venv and run the whole test suite"
	@echo "make lint    ruff + mypy --strict"
	@echo "make bench   run the benchmarks in bench/"
	@echo "make chaos   a long exactly-once audit under every fault (figures for the README)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP) $(SERVE_STAMP)

install: $(STAMP)

$(SERVE_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[service]'
	touch $(SERVE_STAMP)

serve: $(SERVE_STAMP)
	$(BIN)/oncepay serve

test: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python bench/drivers/run.py
	$(BIN)/python bench/overhead/run.py
	$(BIN)/python bench/e2e/run.py

# The long run behind the README's chaos figures (about 100,000 requests): SQLite by default;
# add --database-url postgresql://… and --redis through CHAOS_ARGS.
chaos: $(STAMP)
	$(BIN)/oncepay chaos $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
