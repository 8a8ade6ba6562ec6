# blissctl — `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help setup test test-slow demo demo-rounds bench bench-quality lint clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[1m%-10s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned, so that nothing later resolves a (multi-GB) build of its own choosing
	$(BIN)/pip install --quiet "$(TORCH)"
	# the optional integrations too (lm-eval, Ray Data): make test checks them
	$(BIN)/pip install --quiet -e ".[test,eval,scale]"
	touch $(STAMP)

setup: $(STAMP) ## create .venv and install blissctl with its test tools (TORCH=... to choose a build)

test: $(STAMP) ## run the fast CPU test suite (what CI runs)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP) ## run the slow tests too
	$(BIN)/python -m pytest -q -m ''

demo: $(STAMP) ## train-scorer, select (BLISS and random), pretrain and eval on the embedded sample (2-7 min, by the load)
	$(BIN)/blissctl demo

demo-rounds: $(STAMP) ## blissctl rounds (multi-round BLISS) and its random-rounds control arm on the embedded sample
	$(BIN)/blissctl rounds --run demo-rounds --resume
	$(BIN)/blissctl rounds --scorer random --run demo-rounds-random --resume
	$(BIN)/blissctl dashboard demo-rounds demo-rounds-random --once

bench: $(STAMP) ## run the benchmarks in bench/ and print their figures (tens of minutes)
	$(BIN)/pip install --quiet -e ".[test,eval,scale,bench]"
	$(BIN)/python bench/run_all.py

bench-quality: $(STAMP) ## select with random/BLISS/DSIR/perplexity and pretrain on each (hours on a CPU)
	$(BIN)/pip install --quiet -e ".[test,eval,scale,bench]"
	$(BIN)/python bench/quality.py

lint: $(STAMP) ## ruff over the tree
	$(BIN)/ruff check blissctl engine tui tests bench

clean: ## remove the environment and caches (runs/ is kept)
	rm -rf $(VENV) .pytest_cache build *.egg-info
