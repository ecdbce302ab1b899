PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= config/hipcall.toml

.PHONY: run test test-tools test-fast lint chaos nemesis bench topology clean

$(BIN)/hipcall-ingest: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

run: $(BIN)/hipcall-ingest
	$(BIN)/hipcall-ingest run --config $(CONFIG)

# The unit tier first (one process, no broker, seconds), then the real-broker tiers: end to end in
# E2E_WORKERS processes at once (pytest-xdist; each has its own throwaway RabbitMQ node), then the chaos
# scenarios at 5 s each, one at a time (they load the machine). tests/README.md says what goes where.
E2E_WORKERS ?= 3
test: $(BIN)/hipcall-ingest test-tools
	@$(BIN)/python -c "import xdist" 2>/dev/null || $(BIN)/pip install -q -e '.[test]'
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)
	$(BIN)/python -m pytest -n $(E2E_WORKERS) tests/e2e $(PYTEST_ARGS)
	$(BIN)/python -m pytest tests/chaos $(PYTEST_ARGS)
	NEMESIS_SECONDS=$${NEMESIS_SECONDS:-60} $(BIN)/python -m pytest -s -q tests/nemesis $(PYTEST_ARGS)

# What the real-broker tiers use beside Python's, by Debian package name: util-linux's unshare (the spool's
# disk tests), systemd-analyze (deploy/'s units), chromium (the console's browser test). Installed here when
# missing (as root, like `make bench` installs wrk), or one line says how.
TEST_TOOLS := unshare:util-linux systemd-analyze:systemd chromium:chromium
test-tools:
	@missing=""; for t in $(TEST_TOOLS); do command -v $${t%%:*} >/dev/null || missing="$$missing $${t#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "make test: installing$$missing (Debian packages the tests use)"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q$$missing; \
	  else echo "make test needs Debian's$$missing: sudo apt-get install$$missing"; exit 1; fi; fi

test-fast: $(BIN)/hipcall-ingest
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

# ruff (pyproject.toml [tool.ruff]: pyflakes, import order, bugbear, pyupgrade) on everything, and
# mypy ([tool.mypy]) on ingest/ and workers/. CI runs both before the tests.
lint: $(BIN)/hipcall-ingest
	@$(BIN)/python -m mypy --version >/dev/null 2>&1 || $(BIN)/pip install -q -e '.[test]'
	$(BIN)/python -m ruff check .
	$(BIN)/python -m mypy

# Speed, side by side with baselines (bench/README.md). Installs wrk (Debian's package) and the
# bench extra (FastStream, the baseline worker) if they are missing; about 8 minutes.
bench: $(BIN)/hipcall-ingest
	@command -v wrk >/dev/null || { if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q wrk; \
	  else echo "make bench needs wrk: sudo apt-get install wrk"; exit 1; fi; }
	@$(BIN)/python -c "import faststream" 2>/dev/null || $(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# The chaos suite at full length (30 s of load per scenario; `make test` runs each for 5 s).
chaos: $(BIN)/hipcall-ingest test-tools
	HIPCALL_CHAOS_SECONDS=$${HIPCALL_CHAOS_SECONDS:-30} HIPCALL_CHAOS_SLACK=0 $(BIN)/python -m pytest -s -q tests/chaos $(PYTEST_ARGS)

# Faults in random, overlapping order on a whole deployment (tests/nemesis/, docs/guarantees.md): a seeded
# schedule of NEMESIS_SECONDS (default an hour; `make test` runs 60 s), NEMESIS_SEED=N replays one. It
# prints a table and writes .run/nemesis/result.json; it fails on a lost webhook or a broken promise.
nemesis: $(BIN)/hipcall-ingest test-tools
	NEMESIS_SECONDS=$${NEMESIS_SECONDS:-3600} $(BIN)/python -m pytest -s -q tests/nemesis $(PYTEST_ARGS)

topology: $(BIN)/hipcall-ingest
	$(BIN)/hipcall-ingest topology --config $(CONFIG)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
