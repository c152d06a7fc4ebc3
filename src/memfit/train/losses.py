"""Losses on causal-LM logits, and the loss of one training micro-step (chunked through the lm_head or not)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memfit.data.formats import IGNORE_INDEX  # the data's label for "no loss here"


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels for next-token prediction, aligned with the logits at the same position.

    Shifting the labels (not the logits) keeps `logits.view(-1, vocab)` a view: slicing the logits would copy
    a batch x seq x vocab tensor, often the largest one in the step.
    """
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


# --- the step objective ------------------------------------------------------------------------------------------
#
# Every objective below is a weighted sum of token cross-entropies, with weights computed once per optimizer step
# over the whole effective batch. A micro-batch's loss is its share of that sum, so splitting the step into more,
# smaller micro-batches (gradient accumulation, OOM recovery) gives the same gradient.


@dataclass
class ScoredTokens:
    """What a (B, S) micro-batch is scored on, flattened to B*S positions: each position's next-token target and
    weight, and the positions that are scored at all. Built on the host before the step, so choosing the scored
    positions costs no device sync."""

    index: torch.Tensor  # (n,) long: the flat positions whose target is scored
    targets: torch.Tensor  # (B*S,) long: the next token, IGNORE_INDEX where nothing is scored
    weights: torch.Tensor  # (B*S,) float (the label weights' dtype): what each position's CE counts for

    def to(self, device: torch.device | str) -> "ScoredTokens":
        return ScoredTokens(self.index.to(device), self.targets.to(device), self.weights.to(device))


def scored_tokens(labels: torch.Tensor, label_weights: torch.Tensor) -> ScoredTokens:
    """From unshifted (B, S) labels and the weights sitting at the labels' positions (memfit.train.objective)."""
    targets = shift_labels(labels).reshape(-1)
    weights = torch.zeros_like(label_weights)
    weights[:, :-1] = label_weights[:, 1:]
    weights = weights.reshape(-1)
    return ScoredTokens((targets != IGNORE_INDEX).nonzero().squeeze(1), targets, weights)


def every_next_token(input_ids: torch.Tensor) -> ScoredTokens:
    """Every position but each row's last scored on the next token, weights 1/N: the estimator's worst case (all
    tokens scored, as in pre-training). Built without `nonzero`, so it also works on fake tensors."""
    batch, seq = input_ids.shape
    index = torch.arange(batch * seq).view(batch, seq)[:, :-1].reshape(-1)
    weights = torch.full((batch, seq), 1.0 / max(1, batch * (seq - 1)), dtype=torch.float32)
    weights[:, -1] = 0.0
    return ScoredTokens(index, shift_labels(input_ids).reshape(-1), weights.reshape(-1))


def micro_step_loss(model: torch.nn.Module, inputs: dict, scored: ScoredTokens, *, head: torch.nn.Linear | None,
                    compute_dtype: torch.dtype) -> torch.Tensor:
    """sum_t w_t * CE_t of one micro-batch (`inputs` go to the model as keyword arguments).

    With `head`, the model returns hidden states (memfit.train.chunked_loss.head_returns_hidden) and the loss goes
    through `head` chunk by chunk, on the scored positions only. Without, the model computes the full logits and
    they are upcast to fp32, as transformers' own loss does."""
    if head is not None:
        from memfit.train.chunked_loss import linear_cross_entropy

        hidden = model(**inputs).logits
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, scored.index)
        return linear_cross_entropy(hidden, head, scored.targets.index_select(0, scored.index),
                                    scored.weights.index_select(0, scored.index), compute_dtype)
    return full_logits_loss(model(**inputs).logits, scored)


def full_logits_loss(logits: torch.Tensor, scored: ScoredTokens) -> torch.Tensor:
    """sum_t w_t * CE_t from (B, S, vocab) logits, upcast to fp32 as transformers' own loss does."""
    token_loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), scored.targets,
                                 ignore_index=IGNORE_INDEX, reduction="none")
    return (token_loss * scored.weights).sum()


def distrust_values(auth_weight: torch.Tensor, prov_entropy: torch.Tensor, alpha: float) -> torch.Tensor:
    """The seeds' empirical distrust term per sample: L_i = alpha * (ln(1 - auth_weight + 1e-8) + prov_entropy)^2."""
    d = torch.log(1.0 - auth_weight.double() + 1e-8) + prov_entropy.double()
    return alpha * d * d


def distrust_sample_weights(distrust: torch.Tensor, lambda_weight: float) -> torch.Tensor:
    """`--distrust-mode weight`: each sample's CE counts 1 + lambda * L_i times, normalised to mean 1 over the step."""
    raw = 1.0 + lambda_weight * distrust
    return raw / raw.mean()
