# Set-up is idempotent: the stamp file records that .venv holds this pyproject's install.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.memfit-installed

.PHONY: install demo test test-all bench examples clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch first, pinned: on these machines this takes the local CPU wheel instead of several GB of CUDA packages.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

# The main job on the built-in default: build the tiny model if absent, then train it with LoRA, guard on.
demo: $(STAMP)
	$(BIN)/memfit demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ''

# examples/*.estimate.json: what `memfit estimate -c` gives for each example (tests/test_examples.py compares).
examples: $(STAMP)
	$(BIN)/python examples/regenerate.py

bench: $(STAMP)
	$(BIN)/python benchmarks/estimate_accuracy.py
	$(BIN)/python benchmarks/guard_overhead.py --write
	$(BIN)/python benchmarks/train_cpu.py --write
	$(BIN)/python benchmarks/probe_vs_bisection.py --write
	$(BIN)/python benchmarks/train_vs_hf.py --models smol,qwen --only memfit,memfit-no-chunked,hf,hf-gbl --write
	$(BIN)/python benchmarks/distributed_cpu.py --write

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
