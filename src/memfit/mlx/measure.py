"""Ground truth for the MLX estimate: real MLX training steps in a child process, and MLX's own peak counter.

The child builds the model and the step exactly as `memfit train --engine mlx` does (memfit.mlx.trainer.MlxTrainer:
load_for_training, the optimizer, the compiled step: MlxTrainer.optimizer_step), runs `steps` optimizer steps on random
full-length rows, and reports `mx.get_peak_memory()` (bytes in live MLX arrays at their highest, what the estimate
predicts) for loading and for the steps apart (`mx.reset_peak_memory` between them), with the process's peak RSS.

Run as `python -m memfit.mlx.measure MODEL_DIR CONFIG_JSON [--steps N]` (`--steps 0`: the load alone, for models
whose steps take too long here); prints one JSON object on its last line (mlx-lm's quantizer prints an [INFO] line
of its own before it).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from memfit.runtime import run_python_json


def run_steps(model_dir: str, config_values: dict, steps: int, memory_limit_bytes: int = 0) -> dict:
    """`steps` optimizer steps; `memory_limit_bytes` > 0 sets mx.set_memory_limit for them (after the load). MLX's
    eval allocates each op's output when it schedules it, up to 10 ops ahead of those running
    (mlx/transforms.cpp, MAX_ACTIVE_TASKS), and waits for running ops first only while the active memory is over the
    limit: at 1 byte it waits every time, so the peak is what the step needs in MLX's evaluation order, with nothing
    run ahead (the peak a run under a memory limit at that size holds; `memfit train --engine mlx` sets the limit
    from --max-memory)."""
    import mlx.core as mx
    import numpy as np

    from memfit.allocator import configure as configure_allocator
    from memfit.config import TrainConfig
    from memfit.guard.sampler import peak_rss_bytes
    from memfit.mlx import memory as mlx_memory
    from memfit.mlx.batches import MicroBatch
    from memfit.mlx.trainer import MlxTrainer

    configure_allocator()  # the trainer's malloc policy (MlxTrainer._start_guard), so the RSS is a run's
    mlx_memory.set_eval_width()  # and its order of evaluation
    config = TrainConfig(**config_values)
    trainer = MlxTrainer(None, config, compile_step=True)
    trainer.total_steps = steps
    mlx_memory.reset_peak()
    trainer._build(Path(model_dir))  # the trainer's own load, quantization, adapters, optimizer and compiled step
    load_peak = int(mx.get_peak_memory())
    after_load = int(mx.get_active_memory())
    mx.clear_cache()
    if memory_limit_bytes:
        mx.set_memory_limit(memory_limit_bytes)
    mlx_memory.reset_peak()
    vocab = int(trainer.loaded.config["vocab_size"])
    rng = np.random.default_rng(config.seed)
    batch, seq = config.batch_size, config.seq_len
    step_peaks, step_seconds = [], []
    loss = None
    for _ in range(steps):
        micro_batches = [MicroBatch(mx.array(rng.integers(0, vocab, (batch, seq), dtype=np.int32)),
                                 mx.array(rng.integers(0, vocab, (batch, seq), dtype=np.int32)),
                                 mx.ones((batch, seq), dtype=mx.float32), batch * seq)
                         for _ in range(config.grad_accum)]
        started = time.perf_counter()
        loss_sum, _norm, _tokens = trainer.optimizer_step(micro_batches, len(micro_batches))  # evaluated on return
        step_seconds.append(time.perf_counter() - started)
        del micro_batches
        step_peaks.append(int(mx.get_peak_memory()))
        loss = float(loss_sum) / (batch * seq * config.grad_accum)
    train_peak = int(mx.get_peak_memory())
    return {"load_peak_bytes": load_peak, "after_load_active_bytes": after_load, "train_peak_bytes": train_peak,
            "peak_bytes": max(load_peak, train_peak), "step_peak_bytes": step_peaks, "step_seconds": step_seconds,
            "active_bytes": int(mx.get_active_memory()), "peak_rss_bytes": peak_rss_bytes(), "loss": loss,
            "dtype": trainer.loaded.dtype, "trainable_params": trainer.loaded.counts()[0]}


def measure_in_child(model_dir: str | Path, config_values: dict, steps: int = 3, timeout_s: float = 900,
                     env: dict | None = None, memory_limit_bytes: int = 0, cpu: int | None = None) -> dict:
    """`run_steps` in a fresh interpreter: MLX's peak counter then holds this configuration's arrays alone. `cpu`:
    the one core the child (and MLX's threads in it) may run on."""
    args = [str(model_dir), json.dumps(config_values), "--steps", str(steps),
            "--memory-limit", str(memory_limit_bytes)] + (["--cpu", str(cpu)] if cpu is not None else [])
    return run_python_json(["-m", "memfit.mlx.measure", *args], timeout_s, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("config_json")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--memory-limit", type=int, default=0,
                        help="MLX's memory limit for the steps, bytes (1: the step's need; run_steps says why)")
    parser.add_argument("--cpu", type=int, default=None,
                        help="run on this core alone (set before MLX starts its threads, which inherit it)")
    args = parser.parse_args()
    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    print(json.dumps(run_steps(args.model_dir, json.loads(args.config_json), args.steps, args.memory_limit)))


if __name__ == "__main__":
    main()
