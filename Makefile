# Every target installs what it needs: a fresh clone needs only `make test` or `make demo`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install check test lint demo bench clean chromium

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch/torchvision are pinned first: pip takes these two builds from local disk here.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The fast loop: lint and the unit tests: every test that starts no Ray, MLflow server, PostgreSQL or
# Chromium and is not marked slow (real training or a real store or process for seconds each).
check: install lint
	$(BIN)/python -m pytest -q -m "not integration and not slow"

# Everything, as CI runs it (.ci/run).
test: install chromium lint
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/lottery sweep configs/demo.yaml
	$(BIN)/lottery aggregate demo
	$(BIN)/lottery report demo
	@echo "Browse the runs: $(BIN)/lottery ui demo"

bench: install
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
