# Every target uses .venv; `make dev` creates it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: dev up test test-unit test-integration protos bench clean

dev: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

## Start a local 3-node cluster (embedded etcd), show routing in action, serve until Ctrl-C.
up: dev
	$(BIN)/kvfleet up --nodes 3 --demo

## Unit and integration tests (real etcd, real processes, real gRPC; sim engines).
test: dev
	$(BIN)/pytest -q

test-unit: dev
	$(BIN)/pytest -q tests/unit

test-integration: dev
	$(BIN)/pytest -q tests/integration

## Regenerate kvfleet/v1 from protos/ (the only way generated code changes).
protos: dev
	PYTHON=$(BIN)/python scripts/gen_protos.sh

## Router microbenchmark at 1,000 nodes.
bench: dev
	$(BIN)/python bench/bench_router.py

clean:
	rm -rf $(VENV) .pytest_cache
