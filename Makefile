# fasweep: `make demo` runs a real sweep and prints its report; `make test` runs the tests.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo
DEMO_URI ?= sqlite:///$(abspath $(DEMO_DIR))/mlflow.db

.PHONY: setup test test-fast lint demo bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

test: setup
	$(BIN)/python -m pytest -q -ra

test-fast: setup
	$(BIN)/python -m pytest -q -ra -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

demo: setup
	mkdir -p $(DEMO_DIR)
	$(BIN)/fasweep launch sweeps/quickstart.yaml --tracking-uri $(DEMO_URI)
	$(BIN)/fasweep report quickstart --tracking-uri $(DEMO_URI) --out $(DEMO_DIR)/report

bench: setup
	for f in benchmarks/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
