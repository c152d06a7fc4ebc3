"""What each token's cross-entropy counts for in one optimizer step (the effective batch, all micro-batches).

The weights are fixed before the step runs, over all of its rows, so the step's loss is the same sum however the
rows are split into micro-batches: gradient accumulation and OOM recovery (smaller micro-batches) do not change it.

- `--loss ce`: every scored token counts 1/N (N scored tokens in the step): the token-mean cross-entropy.
- `--loss distrust --distrust-mode weight` (default): sample i (one JSONL line) has distrust L_i = alpha * d_i^2,
  d_i = ln(1 - auth_weight_i + 1e-8) + prov_entropy_i; its mean token CE is weighted by w_i = (1 + lambda L_i)
  normalised to mean 1 over the step's samples, and the loss is mean_i(w_i * CE_i). Low-authority, high-entropy
  sources pull harder on the weights.
- `--loss distrust --distrust-mode add`: the seed's form, token-mean CE + lambda * mean_i(L_i). The added term does
  not depend on the weights, so it shows in the logged loss but adds no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memfit.config import TrainConfig
from memfit.train.losses import IGNORE_INDEX, distrust_sample_weights, distrust_values


@dataclass
class StepObjective:
    row_weights: list[list[float]]  # per row, per label position: what that label's CE counts for
    scored_tokens: int
    samples: int
    distrust_term: float | None  # lambda * mean(L_i) over the step's samples (distrust loss only)


def _scored_positions(labels: list[int], start: int, end: int) -> list[int]:
    # Position 0 of a row is never a target (nothing precedes it), as in shift_labels.
    return [p for p in range(max(start, 1), end) if labels[p] != IGNORE_INDEX]


def step_objective(rows, samples, config: TrainConfig) -> StepObjective:
    """`rows` are the step's memfit.data Rows; `samples` the dataset's records (indexed by a segment's sample)."""
    spans: dict[int, list[tuple[int, int]]] = {}  # sample -> (row, position) of its scored labels
    for row_number, row in enumerate(rows):
        for start, end, sample in row.segments:
            spans.setdefault(sample, []).extend((row_number, p) for p in _scored_positions(row.labels, start, end))
    spans = {sample: positions for sample, positions in spans.items() if positions}
    row_weights = [[0.0] * len(row.input_ids) for row in rows]
    scored = sum(len(positions) for positions in spans.values())
    distrust_term = None
    if config.loss == "distrust" and spans:
        order = sorted(spans)
        auth = torch.tensor([samples[s].auth_weight for s in order], dtype=torch.float64)
        entropy = torch.tensor([samples[s].prov_entropy for s in order], dtype=torch.float64)
        distrust = distrust_values(auth, entropy, config.distrust_alpha)
        distrust_term = float(config.lambda_weight * distrust.mean())
    if config.loss == "distrust" and config.distrust_mode == "weight" and spans:
        weights = distrust_sample_weights(distrust, config.lambda_weight)
        for sample, weight in zip(order, weights.tolist()):
            positions = spans[sample]
            per_token = weight / (len(positions) * len(order))
            for row_number, p in positions:
                row_weights[row_number][p] = per_token
    else:
        for positions in spans.values():
            for row_number, p in positions:
                row_weights[row_number][p] = 1.0 / scored
    return StepObjective(row_weights, scored, len(spans), distrust_term)


def weights_tensor(row_weights: list[list[float]], width: int) -> torch.Tensor:
    """Right-padded (rows, width) float32 tensor, aligned with memfit.data.collate's padding."""
    out = torch.zeros(len(row_weights), width, dtype=torch.float32)
    for i, weights in enumerate(row_weights):
        out[i, : len(weights)] = torch.tensor(weights, dtype=torch.float32)
    return out
