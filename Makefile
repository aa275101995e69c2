# The two commands a newcomer needs:  `make up`  (run the platform locally)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: setup up down status test test-fast lint bench bench-warm chaos clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

up: setup
	scripts/ensure-sandbox
	$(BIN)/faas up

down: setup
	$(BIN)/faas down

status: setup
	$(BIN)/faas status

test: setup
	scripts/ensure-dockerd
	scripts/ensure-sandbox
	$(BIN)/pytest

test-fast: setup
	$(BIN)/pytest -m "not integration"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy faas gateway bench/chaos
	$(BIN)/lint-imports

bench: setup
	$(BIN)/python bench/invoke_latency.py

bench-warm: setup
	$(BIN)/python bench/warm_path.py

chaos: setup
	$(BIN)/python -m bench.chaos --fault all

clean:
	rm -rf $(VENV) .faas .pytest_cache
