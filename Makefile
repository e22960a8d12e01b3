# jitgate — `make help` lists the targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP) ## Create .venv and install jitgate with its dev dependencies

demo: $(STAMP) ## Run the demo replay app with jitgate in front of it on :8080
	@command -v redis-server >/dev/null || { echo "redis-server is missing: install it (Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis) or set redis.url in config/jitgate.yaml"; exit 1; }
	$(BIN)/python deploy/demo/launch.py

lint: $(STAMP) ## ruff (lint and format check) and mypy --strict
	$(BIN)/ruff check proxy tests deploy bench harden
	$(BIN)/ruff format --check proxy tests deploy bench harden
	$(BIN)/mypy

test: $(STAMP) ## Lint, then run the whole test suite
	$(MAKE) lint
	$(BIN)/pytest -q

bench: $(STAMP) ## Load-test upstream, pass-through, jitgate and a naive check; forward-auth decisions/s; 1 and 2 workers
	bash .ci/install.sh wrk:wrk nginx:nginx-light  # the load generator and the fast upstream
	$(BIN)/python bench/run.py --latency
	$(BIN)/python bench/kept.py
	$(BIN)/python bench/authz.py
	$(BIN)/python bench/workers.py

harden: $(STAMP) ## Run the hardening checks (harden/check_*.py), one line each; <= 20 min
	bash .ci/install.sh nginx:nginx-light redis-server:redis-server  # a router, the grant store
	$(BIN)/python harden/run.py

soak: $(STAMP) ## Thirty minutes at half the maximum rate, grants and the policy changing throughout
	bash .ci/install.sh nginx:nginx-light redis-server:redis-server  # the upstream, the grant store
	$(BIN)/python harden/soak.py

clean: ## Remove the venv, caches and the demo state directory
	rm -rf $(VENV) .jitgate .pytest_cache .mypy_cache .ruff_cache

.PHONY: help venv demo lint test bench harden soak clean
