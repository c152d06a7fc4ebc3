"""Losses on causal-LM logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels for next-token prediction, aligned with the logits at the same position.

    Shifting the labels (not the logits) keeps `logits.view(-1, vocab)` a view: slicing the logits would copy
    a batch x seq x vocab tensor, often the largest one in the step.
    """
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def per_sample_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token cross-entropy of each sample, in fp32, and each sample's count of scored tokens.

    `labels` are the unshifted input labels (IGNORE_INDEX where no loss is wanted).
    """
    targets = shift_labels(labels)
    batch, seq, vocab = logits.shape
    token_loss = F.cross_entropy(
        logits.view(-1, vocab).float(), targets.view(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(batch, seq)
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    return token_loss.sum(dim=1) / counts.clamp(min=1), counts


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy over the batch (every scored token counts once)."""
    per_sample, counts = per_sample_ce(logits, labels)
    return (per_sample * counts).sum() / counts.sum().clamp(min=1)


# --- the step objective ------------------------------------------------------------------------------------------
#
# Every objective below is a weighted sum of token cross-entropies, with weights computed once per optimizer step
# over the whole effective batch. A micro-batch's loss is its share of that sum, so splitting the step into more,
# smaller micro-batches (gradient accumulation, OOM recovery) gives the same gradient.


def weighted_token_loss(logits: torch.Tensor, labels: torch.Tensor, label_weights: torch.Tensor) -> torch.Tensor:
    """sum_t w_t * CE_t, where `label_weights` sit at the positions of `labels` (unshifted, like the labels)."""
    targets = shift_labels(labels)
    weights = torch.zeros_like(label_weights)
    weights[:, :-1] = label_weights[:, 1:]
    batch, seq, vocab = logits.shape
    token_loss = F.cross_entropy(
        logits.view(-1, vocab).float(), targets.view(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return (token_loss * weights.view(-1)).sum()


def distrust_values(auth_weight: torch.Tensor, prov_entropy: torch.Tensor, alpha: float) -> torch.Tensor:
    """The seeds' empirical distrust term per sample: L_i = alpha * (ln(1 - auth_weight + 1e-8) + prov_entropy)^2."""
    d = torch.log(1.0 - auth_weight.double() + 1e-8) + prov_entropy.double()
    return alpha * d * d


def distrust_sample_weights(distrust: torch.Tensor, lambda_weight: float) -> torch.Tensor:
    """`--distrust-mode weight`: each sample's CE counts 1 + lambda * L_i times, normalised to mean 1 over the step."""
    raw = 1.0 + lambda_weight * distrust
    return raw / raw.mean()
