PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PORT ?= 8000
WORKERS ?= 1

.PHONY: install run serve test bench campaign lint format clean

$(STAMP): pyproject.toml client/pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet -e '.[dev]' -e ./client
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/python manage.py demo --port $(PORT) --workers $(WORKERS)

serve: install
	$(BIN)/python manage.py serve --port $(PORT) --workers $(WORKERS)

test: install lint
	bash scripts/ensure_browser.sh
	$(BIN)/python scripts/ensure_services.py
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python bench/bench_dissect.py

# Load, faults and hostile input against a live service on a private Postgres, Redis and media
# tmpfs (needs root for the tmpfs and to run Postgres as its own user); ends with a table.
# CAMPAIGN_ARGS=--quick for a ~3.5 minute smoke run.
campaign: install
	$(BIN)/python -m bench.campaign $(CAMPAIGN_ARGS)

# ruff lint and format (rules and line length in pyproject.toml) and mypy on dissect_core;
# `make test` runs it first.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf var
