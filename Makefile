# The two commands of the quick start: `make up` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: up test lint test-external bench profile clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

up: $(STAMP)  ## start the whole pipeline on embedded PostgreSQL and Kafka
	$(BIN)/eventpipe up

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint  ## lint, type-check, then the whole test suite
	$(BIN)/pytest

# The suite again on an existing PostgreSQL (a fresh database is made there and
# dropped), without the slow fault tests: those exercise the broker, the
# collector and the loaders' recovery, not what differs between servers.
test-external: $(STAMP)
	EVENTPIPE_TEST_POSTGRES_DSN=$${EVENTPIPE_TEST_POSTGRES_DSN:-postgresql://postgres@127.0.0.1:5432/postgres} $(BIN)/pytest -m "not slow"

BENCH_STAMP := $(VENV)/.bench-$(shell cksum pyproject.toml | cut -d' ' -f1)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	rm -f $(VENV)/.bench-*
	touch $@

# Load benchmarks (benchmarks/README.md); QUICK=1 for the < 3 minute version.
bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.run $(if $(QUICK),--quick,)

# Where the collector's time goes under wrk, by stage (benchmarks/README.md).
profile: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.profile_collector --protocol $(or $(PROTOCOL),native)

clean:
	rm -rf $(VENV) .eventpipe .mypy_cache .ruff_cache .pytest_cache
