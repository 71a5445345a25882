# ingest — the two commands a new user needs: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: all run test lint bench samples clean interop-deps

all: lint test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The main job on the embedded defaults.
run: $(STAMP)
	$(BIN)/ingest --config config/ingest.toml serve

test: $(STAMP) interop-deps
	$(BIN)/python -m pytest -q -n 2

lint: $(STAMP)
	$(BIN)/ruff check ingest tests samples bench
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python -m bench.run

samples: $(STAMP)
	$(BIN)/python -m samples.generate --out samples/studies --small

# The Medplum reference server for tests/interop (skipped by the tests when node is absent).
interop-deps:
	@if command -v npm >/dev/null 2>&1 && [ -f tests/interop/package-lock.json ] && [ ! -d tests/interop/node_modules ]; then \
		cd tests/interop && npm ci --no-audit --no-fund --loglevel=error; \
	fi

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
