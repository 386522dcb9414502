# Storyline — run `make help` for the targets. Everything runs from the project venv (.venv), made on demand.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CONFIG ?= configs/local.toml
PYTEST_ARGS ?=
EVENTS ?= 20000
DEMO ?= --set store.path=.data/demo.db

.DEFAULT_GOAL := help
.PHONY: help install run test unit lint bench db-up db-down db-status db-cluster-up db-cluster-down clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install Storyline with its dev tools

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@# constraints.txt: the versions last tested together (a new polars minor release once broke a fresh install)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

run: install ## the demo on the embedded store: simulated sensors, ingest, 2 workers building stories, results
	@mkdir -p .data
	@# The demo starts from an empty store of its own each time (the same simulated ids ingested twice would
	@# be re-ingests, and verify would rightly report them).
	rm -f .data/demo.db .data/demo.db-wal .data/demo.db-shm
	$(BIN)/storyline init --config $(CONFIG) $(DEMO)
	$(BIN)/storyline simulate --config $(CONFIG) $(DEMO) --events $(EVENTS) --out .data/demo.jsonl.gz --truth .data/demo-truth.json
	$(BIN)/storyline ingest --config $(CONFIG) $(DEMO) .data/demo.jsonl.gz
	@# run --drain itself waits (about lag_ms) until the events written before it started are readable.
	$(BIN)/storyline run --config $(CONFIG) $(DEMO) --workers 2 --drain
	$(BIN)/storyline status --config $(CONFIG) $(DEMO) | tail -n 1
	$(BIN)/storyline stories --config $(CONFIG) $(DEMO) --limit 8
	$(BIN)/storyline verify --config $(CONFIG) $(DEMO) --truth .data/demo-truth.json
	@$(BIN)/storyline stories --config $(CONFIG) $(DEMO) --format jsonl > .data/demo-stories.jsonl 2>/dev/null
	@echo "two fused stories (the most sources), then accuracy against the simulator's truth:"
	@$(BIN)/python -m engine.tools.accuracy --stories .data/demo-stories.jsonl --truth .data/demo-truth.json --show 2

test: install lint ## lint, start the local CQL node when Java and Maven exist, run every test
	@if command -v java >/dev/null 2>&1 && command -v mvn >/dev/null 2>&1; then \
		db/cql-node up; \
	else \
		echo "make test: no Java/Maven here, the CQL tests will be skipped (CI requires them)"; \
	fi
	$(BIN)/pytest $(PYTEST_ARGS)

unit: install ## the fast tier only: no database server
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

lint: install ## ruff (lint + format check) and mypy --strict
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict engine bench tests

bench: install ## benchmarks against the embedded store and the local CQL node (started if needed)
	db/cql-node up
	POLARS_MAX_THREADS=1 $(BIN)/python -m bench

db-up: ## start the local CQL node (Apache Cassandra 5.0 on 127.0.0.1:9042) and wait until it answers
	db/cql-node up

db-down: ## stop the local CQL node started by db-up
	db/cql-node down

db-status: ## exit 0 when the local CQL node answers
	db/cql-node status

db-cluster-up: ## start the local three-node CQL cluster (127.0.0.1-3:9042) and wait until all see each other UP
	db/cql-node cluster-up

db-cluster-down: ## stop the nodes of the local CQL cluster started by db-cluster-up
	db/cql-node cluster-down

clean: ## remove the venv, the local node's data and the embedded database
	-db/cql-node down
	rm -rf $(VENV) .cql .data
