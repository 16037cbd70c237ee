# PIAA: every target a developer or CI needs. `make help` lists them.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
PHOTOS ?=

.DEFAULT_GOAL := help
.PHONY: help setup test test-deps unit integration lint format demo serve bench soak quality upgrade-drill clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: ## Create .venv, generate stubs, find redis-server, prepare Triton, build the models (idempotent)
	@bash scripts/setup.sh

test: setup lint test-deps ## The whole suite: lint, unit and integration tests
	$(PY) -m pytest $(PYTEST_ARGS)

test-deps: ## System packages the tests need (Debian chromium for the report test)
	@bash scripts/test_deps.sh

unit: setup ## Unit tests only (no network, no subprocesses)
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

integration: setup ## Integration tests only (real redis-server, tritonserver, gRPC)
	$(PY) -m pytest -m integration $(PYTEST_ARGS)

lint: setup ## ruff lint, ruff format check, mypy on our packages
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: setup ## Apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: setup ## The main job end to end: start the stack, enroll a user, rank an album, write the report
	$(PY) -m piaa_personalization.demo $(if $(PHOTOS),--photos $(PHOTOS))

serve: setup ## Start Redis, Triton (CPU profile) and the gateway for local use; Ctrl-C stops all
	$(PY) -m piaa_personalization.serve

bench: setup ## The CPU benchmark suite (results under benchmarks/results/); PEER=1 adds the Ray Serve peer
	$(if $(PEER),$(VENV)/bin/pip install --quiet -r requirements/bench-peer.txt -c requirements/constraints.txt)
	$(PY) -m piaa_bench.suite $(if $(PEER),--peer)

soak: setup ## 10-minute soak at ~70% of peak: errors and RSS growth of gateway and Triton (docs/reliability.md)
	$(PY) -m piaa_bench.soak --duration 600 --fraction 0.7

quality: setup ## Personalization quality report on simulated raters (docs/quality.md; needs PHOTOS=dir with labels.csv)
	$(PY) -m piaa_personalization.evaluation report --photos $(or $(PHOTOS),../shared/data/photos) --out build/eval/quality_report.md

upgrade-drill: setup ## Heads upgrade on a live local stack under load: migrate, switch, check (docs/operations.md)
	$(PY) -m piaa_bench.upgrade_drill --photos $(or $(PHOTOS),../shared/data/photos)

clean: ## Remove build outputs (keeps .venv)
	rm -rf build .setup/models .pytest_cache .mypy_cache .ruff_cache
