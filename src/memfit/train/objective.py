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

Every scored token of a sample counts the same, so the objective is one number per sample; a micro-batch's
per-token weights are then one gather (`label_weights`), not a loop over tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memfit.config import TrainConfig
from memfit.train.losses import IGNORE_INDEX, distrust_sample_weights, distrust_values


@dataclass
class StepObjective:
    token_weight: dict[int, float]  # Dataset.samples index -> what each of that sample's scored labels counts for
    scored_tokens: int
    samples: int
    distrust_term: float | None  # lambda * mean(L_i) over the step's samples (distrust loss only)


def step_objective(rows, samples, config: TrainConfig) -> StepObjective:
    """`rows` are the step's memfit.data Rows (with their scored counts); `samples` the dataset's records."""
    scored_by_sample: dict[int, int] = {}
    for row in rows:
        for (_, _, sample), scored in zip(row.segments, row.scored):
            scored_by_sample[sample] = scored_by_sample.get(sample, 0) + scored
    scored_by_sample = {sample: count for sample, count in scored_by_sample.items() if count}
    scored = sum(scored_by_sample.values())
    order = sorted(scored_by_sample)
    distrust_term = None
    if config.loss == "distrust" and order:
        auth = torch.tensor([samples[s].auth_weight for s in order], dtype=torch.float64)
        entropy = torch.tensor([samples[s].prov_entropy for s in order], dtype=torch.float64)
        distrust = distrust_values(auth, entropy, config.distrust_alpha)
        distrust_term = float(config.lambda_weight * distrust.mean())
    if config.loss == "distrust" and config.distrust_mode == "weight" and order:
        weights = distrust_sample_weights(distrust, config.lambda_weight).tolist()
        token_weight = {s: w / (scored_by_sample[s] * len(order)) for s, w in zip(order, weights)}
    else:
        token_weight = {s: 1.0 / scored for s in order}
    return StepObjective(token_weight, scored, len(order), distrust_term)


def label_weights(objective: StepObjective, batch) -> torch.Tensor:
    """(B, S) float32 weights at the positions of `batch.labels` (a memfit.data Batch, on the host): the sample's
    token weight where the label is scored (not IGNORE, not a row's position 0), else 0."""
    per_sample = torch.tensor([objective.token_weight.get(s, 0.0) for s in batch.sample_ids] or [0.0],
                              dtype=torch.float32)
    scored = batch.labels != IGNORE_INDEX
    scored[:, 0] = False
    return torch.where(scored, per_sample[batch.sample_index.clamp(min=0)], 0.0)
