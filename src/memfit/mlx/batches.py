"""Rows of memfit's data as MLX arrays: the collate, scored targets and token weights the torch engine uses, padded
to a multiple of PAD_MULTIPLE (as mlx-lm pads: fewer shapes, fewer recompilations of the compiled step)."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

PAD_MULTIPLE = 32


@dataclass
class MicroBatch:
    inputs: mx.array  # (rows, width) token ids
    targets: mx.array  # (rows, width) the next token at each position (0 where nothing is scored)
    weights: mx.array  # (rows, width) fp32 token weights: the step objective's, or 1 per scored token
    tokens: int  # real (unpadded) tokens


def micro_batch(rows: list, samples: list, pad_id: int, objective=None, max_width: int | None = None) -> MicroBatch:
    """`rows` (of a dataset whose samples are `samples`) as one micro-batch. With the step objective
    (memfit.train.objective) its token weights; without one (evaluation), every scored token weighs 1.

    A row's last token is only a target: the position after it is never scored, so it is not fed (as mlx-lm feeds
    a row but its last token). The width is padded to a multiple of PAD_MULTIPLE, at most `max_width` (the trainer
    passes seq_len - 1: full rows take no padding)."""
    from memfit.data import collate
    from memfit.train.losses import IGNORE_INDEX, scored_tokens
    from memfit.train.objective import label_weights

    batch = collate(rows, samples, pad_id)
    if objective is None:
        weights = (batch.labels != IGNORE_INDEX).float()
        weights[:, 0] = 0.0
    else:
        weights = label_weights(objective, batch)
    scored = scored_tokens(batch.labels, weights)
    count, full = batch.input_ids.shape
    width = max(full - 1, 1)
    padded = -(-width // PAD_MULTIPLE) * PAD_MULTIPLE
    if max_width is not None:
        padded = max(min(padded, max_width), width)
    inputs = np.full((count, padded), pad_id, dtype=np.int32)
    targets = np.zeros((count, padded), dtype=np.int32)
    token_weights = np.zeros((count, padded), dtype=np.float32)
    inputs[:, :width] = batch.input_ids.numpy()[:, :width]
    flat_targets = scored.targets.view(count, full).numpy()[:, :width]
    targets[:, :width] = np.where(flat_targets == IGNORE_INDEX, 0, flat_targets)
    token_weights[:, :width] = scored.weights.view(count, full).numpy()[:, :width]
    return MicroBatch(mx.array(inputs), mx.array(targets), mx.array(token_weights), batch.num_tokens)
