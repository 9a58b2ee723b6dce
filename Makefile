# e2e-wsi developer and user entry points. `make test` and `make demo` each install first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?= -n 2 -m "not slow" --timeout 900
DEMO_DIR ?= demo

.PHONY: install test test-all demo bench lint clean

INSTALL_LOG := $(VENV)/install.log
# pip's output (per-package "Location ... is ignored" notes from a machine's pip config, setuptools'
# "Editable installation" notice) goes to a log shown in full only when the install fails.
PIP := PIP_DISABLE_PIP_VERSION_CHECK=1 $(BIN)/python -m pip
LOGGED := >>$(INSTALL_LOG) 2>&1 || { echo "make install: pip failed; its log ($(INSTALL_LOG)):"; cat $(INSTALL_LOG); exit 1; }

# Re-install only when the package metadata changes; otherwise this is a no-op.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "make install: installing e2e-wsi and its dependencies into $(VENV) (first time: a few minutes; log: $(INSTALL_LOG))"
	@: >$(INSTALL_LOG)
	@$(PIP) install -q --upgrade pip $(LOGGED)
	@$(PIP) install -q -e '.[test]' $(LOGGED)
	@touch $(STAMP)
	@echo "make install: done ($$($(BIN)/e2e-wsi --version))"

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
