PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= config/hipcall.toml

.PHONY: run test chaos bench topology clean

$(BIN)/hipcall-ingest: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

run: $(BIN)/hipcall-ingest
	$(BIN)/hipcall-ingest run --config $(CONFIG)

test: $(BIN)/hipcall-ingest
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The chaos suite at full length (30 s of load per scenario; `make test` runs each for 8 s).
chaos: $(BIN)/hipcall-ingest
	HIPCALL_CHAOS_SECONDS=$${HIPCALL_CHAOS_SECONDS:-30} HIPCALL_CHAOS_SLACK=0 $(BIN)/python -m pytest -s -q tests/chaos $(PYTEST_ARGS)

topology: $(BIN)/hipcall-ingest
	$(BIN)/hipcall-ingest topology --config $(CONFIG)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
