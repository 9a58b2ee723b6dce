# e2e-wsi developer and user entry points. `make test` and `make demo` each install first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?= -n 2 -m "not slow" --timeout 900
DEMO_DIR ?= demo

.PHONY: install test test-all demo bench lint clean

# Re-install only when the package metadata changes; otherwise this is a no-op.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest -n 2 --timeout 1800

demo: install
	$(BIN)/python scripts/demo.py --out $(DEMO_DIR)

bench: install
	$(BIN)/python benchmarks/run_all.py

lint: install
	$(BIN)/ruff check e2e_wsi tests benchmarks scripts
	$(BIN)/ruff format --check e2e_wsi tests benchmarks scripts

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
