# fasweep: `make demo` runs a real sweep and prints its report; `make test` runs the tests.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_SPEC ?= sweeps/quickstart.yaml
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

# Fashion-MNIST when a copy is found or downloadable, else scikit-learn's digits (offline); one line says which.
demo: setup
	mkdir -p $(DEMO_DIR)
	data=$$($(BIN)/python -m fasweep.demo $(DEMO_SPEC)) && \
		$(BIN)/fasweep launch $(DEMO_SPEC) --tracking-uri $(DEMO_URI) --set base.data.name=$$data
	$(BIN)/fasweep report quickstart --tracking-uri $(DEMO_URI) --out $(DEMO_DIR)/report

bench: setup
	for f in benchmarks/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
