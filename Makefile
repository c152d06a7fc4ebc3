# Set-up is idempotent: the stamp file records that .venv holds this pyproject's install from this lock.
# The lock (constraints.txt) holds the exact versions the suite passed with; pyproject.toml keeps `>=` ranges for
# users. `make test-latest` tries the newest versions the ranges allow in a separate venv and says what broke.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.memfit-installed
LOCK   := constraints.txt
LATEST := .venv-latest

.PHONY: install demo test test-all test-latest lock bench examples clean

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -c $(LOCK) pip
	# torch first, pinned: on these machines this takes the local CPU wheel instead of several GB of CUDA packages.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -c $(LOCK) torch==2.13.0
	$(BIN)/pip install -c $(LOCK) -e '.[dev,bench,mlx]'
	# A venv made before the lock may hold other versions: say so rather than test something else than CI does.
	$(BIN)/python tools/lock.py $(LOCK)
	touch $(STAMP)

# The main job on the built-in default: build the tiny model if absent, then train it with LoRA, guard on.
demo: $(STAMP)
	$(BIN)/memfit demo

# --durations: the slowest tests, so a slow one shows in CI's log (each test over 30 s says why in its docstring).
# Two pytest workers (pytest-xdist; a file's tests stay on one worker, so its module fixtures are built once), each
# process on one thread: on 2 cores that took the suite from 1,099 s to 618 s. Two workers with torch's default
# threads oversubscribe the cores (OpenMP threads spin): 1,071 s and 65% more CPU time. Measured on clean clones,
# idle 2-core Xeon, 2026-12-03. TEST_WORKERS=1 runs the suite in one process.
TEST_WORKERS ?= 2
TEST_RUN = OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile
test: $(STAMP)
	$(TEST_RUN) --durations=25

test-all: $(STAMP)
	$(TEST_RUN) -m ''

# examples/*.estimate.json: what `memfit estimate -c` gives for each example (tests/test_examples.py compares).
examples: $(STAMP)
	$(BIN)/python examples/regenerate.py

# Every section of docs/benchmarks.md, each with exactly the command its header names (hours on 2 cores; CPU only).
bench: $(STAMP)
	$(BIN)/python benchmarks/estimate_accuracy.py --device cpu --write
	$(BIN)/python benchmarks/estimate_accuracy.py --device cpu --moe --write
	$(BIN)/python benchmarks/estimate_speed.py --repeats 3 --cold-repeats 2
	$(BIN)/python benchmarks/trace_cuts.py --write
	$(BIN)/python benchmarks/architecture_sweep.py --write
	$(BIN)/python benchmarks/guard_overhead.py --write
	$(BIN)/python benchmarks/guard_stop_overshoot.py --runs 5 --leak-mb 100 --blocks 10 --write
	$(BIN)/python benchmarks/train_cpu.py --write
	$(BIN)/python benchmarks/probe_vs_bisection.py --write --quick
	$(BIN)/python benchmarks/demo_learning.py --write
	$(BIN)/python benchmarks/summation_order.py --steps 8 --write
	$(BIN)/python benchmarks/figures.py all --write
	$(BIN)/python benchmarks/layer_kernels.py --repeats 5 --iterations 20 --write
	$(BIN)/python benchmarks/allocator_policies.py --repeats 3 --steps 8 --layers 30 --policies threshold,trim,none,threshold+thp,trim+thp --write
	$(BIN)/python benchmarks/step_cost.py --layers 30 --steps 8 --repeats 3 --threads 1 --write
	$(BIN)/python benchmarks/saved_for_backward.py --write
	$(BIN)/python benchmarks/qlora_layout.py --write
	$(BIN)/python benchmarks/derive_constants.py --write
	taskset -c 1 $(BIN)/python benchmarks/train_vs_hf.py --models smol,qwen --datasets text --repeats 3 --steps 4 --seq-len 512 --threads 1 --malloc threshold --check-loss --write
	taskset -c 1 $(BIN)/python benchmarks/train_vs_hf.py --models smol,qwen --datasets pc --repeats 3 --steps 4 --seq-len 512 --threads 1 --malloc threshold --check-loss --write
	taskset -c 1 $(BIN)/python benchmarks/train_vs_hf.py --models smol-cut,qwen-cut --datasets text,pc --repeats 3 --steps 4 --seq-len 512 --threads 1 --malloc threshold --check-loss --write
	$(BIN)/python benchmarks/heap_retention.py --write
	$(BIN)/python benchmarks/head_transient.py --write
	$(BIN)/python benchmarks/distributed_cpu.py --steps 16 --write
	# MLX (CPU build): the estimate against real MLX steps, then memfit's engine against mlx-lm.
	$(BIN)/python benchmarks/estimate_accuracy.py --engine mlx --timeout 1800 --write
	taskset -c 1 $(BIN)/python benchmarks/mlx_vs_mlx_lm.py --preset tiny --steps 20 --repeats 5 --write
	taskset -c 1 $(BIN)/python benchmarks/mlx_vs_mlx_lm.py --preset smollm2-135m --batch-size 1 --seq-len 128 --steps 6 --repeats 3 --contenders memfit,mlx_lm --write

# The newest versions pyproject.toml's ranges allow, in their own venv (the locked .venv is left alone): prints what
# changed against the lock, then runs the suite; a failure there names what a newer release broke.
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST) || python3 -m venv $(LATEST)
	$(LATEST)/bin/pip install --upgrade pip
	$(LATEST)/bin/python -c "import torch" 2>/dev/null || $(LATEST)/bin/pip install torch==2.13.0
	$(LATEST)/bin/pip install --upgrade --upgrade-strategy eager -e '.[dev,bench,mlx]'
	$(LATEST)/bin/python tools/lock.py $(LOCK) --report-only
	$(LATEST)/bin/python -m pytest -p no:cacheprovider || { echo "make test-latest: the newest versions above break the tests listed (the lock in $(LOCK) still passes: make test)"; exit 1; }

# After a green `make test-latest`: take its versions as the new lock.
lock:
	$(LATEST)/bin/python tools/lock.py $(LOCK) --write

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info src/*.egg-info
