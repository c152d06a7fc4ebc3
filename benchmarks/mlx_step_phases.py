"""Where an MLX training step's peak comes from: MLX's peak counter for the parts of memfit's MLX step, evaluated
uncompiled in one process, one part at a time (`mx.reset_peak_memory` between them).

    python benchmarks/mlx_step_phases.py MODEL_DIR [--batch-size 2 --seq-len 1024 --dtype bf16]
        [--no-grad-checkpointing] [--no-chunked-loss] [--min-chunk-tokens N]

Parts, each as bytes above the model's own arrays:
- forward: the loss alone;
- forward + backward: `nn.value_and_grad` of the loss, gradients and loss evaluated together;
- fused step: the gradient, `clip_grad_norm` at `--max-grad-norm` and the AdamW update in one graph (the trainer's
  step until 2026-12-05);
- step without clipping: the gradient and the update in one graph;
- gradients first: the gradients evaluated, then clipping and the update;
- trainer step: the trainer's own `optimizer_step`, uncompiled (gradients first when it clips).
`--min-chunk-tokens N` replaces memfit.train.chunk_size.MLX_MIN_CHUNK_TOKENS (the MLX chunked loss's floor on a chunk,
32) for this run: what smaller chunks would hold. The model directory is one `memfit init-model` (or
memfit.models.init_model) wrote. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--no-grad-checkpointing", action="store_true")
    parser.add_argument("--no-chunked-loss", action="store_true")
    parser.add_argument("--min-chunk-tokens", type=int)
    args = parser.parse_args()
    if args.min_chunk_tokens:
        from memfit.train import chunk_size

        chunk_size.MLX_MIN_CHUNK_TOKENS = args.min_chunk_tokens  # read by mlx_chunk_tokens at each call
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np

    from memfit.config import TrainConfig
    from memfit.mlx.batches import MicroBatch
    from memfit.mlx.trainer import MlxTrainer
    from memfit.train.chunk_size import mlx_chunks

    config = TrainConfig(method="lora", dtype=args.dtype, batch_size=args.batch_size, seq_len=args.seq_len,
                         max_grad_norm=args.max_grad_norm, grad_checkpointing=not args.no_grad_checkpointing,
                         chunked_loss=not args.no_chunked_loss)
    trainer = MlxTrainer(None, config, compile_step=False)
    trainer.total_steps = 1
    trainer._build(Path(args.model_dir))
    model = trainer.model
    vocab = int(trainer.loaded.config["vocab_size"])
    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.seq_len)
    inputs = mx.array(rng.integers(0, vocab, shape, dtype=np.int32))
    targets = mx.array(rng.integers(0, vocab, shape, dtype=np.int32))
    weights = mx.ones(shape)
    mx.eval(inputs, targets, weights)
    loss_and_grad = nn.value_and_grad(model, trainer._loss)

    def forward():
        mx.eval(trainer._loss(model, inputs, targets, weights))

    def forward_backward():
        loss, grads = loss_and_grad(model, inputs, targets, weights)
        mx.eval(grads, loss)

    def fused_step():
        loss, grads = loss_and_grad(model, inputs, targets, weights)
        clipped, norm = optim.clip_grad_norm(grads, args.max_grad_norm)
        trainer.optimizer.update(model, clipped)
        mx.eval(trainer._state, norm, loss)

    def unclipped_step():
        loss, grads = loss_and_grad(model, inputs, targets, weights)
        trainer.optimizer.update(model, grads)
        mx.eval(trainer._state, loss)

    def gradients_first():
        loss, grads = loss_and_grad(model, inputs, targets, weights)
        mx.eval(grads, loss)
        clipped, norm = optim.clip_grad_norm(grads, args.max_grad_norm)
        trainer.optimizer.update(model, clipped)
        mx.eval(trainer._state, norm)

    def trainer_step():
        trainer.optimizer_step([MicroBatch(inputs, targets, weights, args.batch_size * args.seq_len)], 1)

    mx.clear_cache()
    base = mx.get_active_memory()
    found = {"model_bytes": int(base), "config": {key: getattr(config, key) for key in (
        "batch_size", "seq_len", "dtype", "grad_checkpointing", "chunked_loss", "max_grad_norm")},
        "chunk_tokens": mlx_chunks(args.batch_size * args.seq_len, vocab, int(trainer.loaded.config["hidden_size"]))
        if config.chunked_loss else 0}
    for name, part in (("forward", forward), ("forward_backward", forward_backward), ("fused_step", fused_step),
                       ("unclipped_step", unclipped_step), ("gradients_first", gradients_first),
                       ("trainer_step", trainer_step)):
        mx.clear_cache()
        mx.reset_peak_memory()
        part()
        found[f"{name}_bytes"] = int(mx.get_peak_memory() - base)
    print(json.dumps(found))


if __name__ == "__main__":
    main()
