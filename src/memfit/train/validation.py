"""The validation loss, one function for `memfit train --val-data` and `memfit eval`: mean cross-entropy per
scored token, with the trainer's pieces (collate, the scored positions, the model's inputs, and the head applied
chunk by chunk where the model allows it, full logits otherwise)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


def model_inputs(batch, device, position_packing: bool = True, by_segment: bool = False) -> dict[str, Any]:
    """What the model gets, on its device (only these tensors are copied there). Causal attention needs no mask
    for right padding: real tokens never see the pads after them. Packed rows restart their position ids at
    each sample, which transformers turns into a block-diagonal mask (`position_packing`: the architecture keeps
    them apart by position ids; else they get a 2D mask). `by_segment`: the model runs attention on each segment
    alone (memfit.models.attention.SEGMENTED), which takes the segments' bounds, kept on the CPU."""
    from memfit.models.attention import segment_bounds

    bounds = {}
    if not batch.packed:
        extra = {}
    elif position_packing:
        extra = {"position_ids": batch.position_ids}
        if by_segment:
            bounds = {"cu_seq_lens_q": segment_bounds(batch.position_ids)}
    else:
        extra = {"attention_mask": batch.attention_mask}
    # use_cache=False: with a KV cache, transformers ignores the position-id boundaries (memfit.models.attention).
    return {"input_ids": batch.input_ids.to(device), **{name: tensor.to(device) for name, tensor in extra.items()},
            **bounds, "use_cache": False}


def token_losses(model, inputs: dict[str, Any], scored, head, compute_dtype) -> torch.Tensor:
    """Each scored position's cross-entropy (n,), fp32, through `head` by chunks when given (the model then returns
    hidden states: memfit.train.chunked_loss.head_returns_hidden), else from the full logits."""
    from memfit.train.chunked_loss import linear_token_losses

    output = model(**inputs).logits
    flat = output.reshape(-1, output.shape[-1]).index_select(0, scored.index)
    targets = scored.targets.index_select(0, scored.index)
    if head is not None:
        return linear_token_losses(flat, head, targets, compute_dtype)
    return F.cross_entropy(flat.float(), targets, reduction="none")


@dataclass
class ValidationLoss:
    loss_sum: float  # the scored tokens' cross-entropies, summed in fp64
    tokens: int  # scored tokens
    samples: list[dict[str, Any]] = field(default_factory=list)  # per sample (when asked): line, loss, tokens

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.tokens, 1)


@torch.no_grad()
def validation_loss(model, dataset, rows: list, batch_size: int, pad_id: int, device, *, head, compute_dtype,
                    position_packing: bool = True, by_segment: bool = False, batches: int | None = None,
                    per_sample: bool = False,
                    on_batch: Callable[[int, int, int], None] | None = None) -> ValidationLoss:
    """The loss of `rows` (of `dataset`) in batches of `batch_size`. `batches` above the batches `rows` make: as
    many forward passes in all, the extra ones on one row with nothing counted (engines whose forward passes hold
    collectives need every rank to run as many). `on_batch(done, total, tokens)` after each batch."""
    from memfit.data import collate
    from memfit.train.losses import IGNORE_INDEX, scored_tokens

    starts: list[int | None] = list(range(0, len(rows), batch_size))
    if batches is not None:
        starts += [None] * (batches - len(starts))  # a filler forward on one row, its loss not counted
    result = ValidationLoss(0.0, 0)
    for number, start in enumerate(starts, 1):
        chunk = rows[:1] if start is None else rows[start:start + batch_size]
        batch = collate(chunk or dataset.rows[:1], dataset.samples, pad_id)
        scored = scored_tokens(batch.labels, (batch.labels != IGNORE_INDEX).float()).to(device)
        losses = token_losses(model, model_inputs(batch, device, position_packing, by_segment), scored, head,
                              compute_dtype).double().cpu()
        if start is None:
            continue
        if per_sample:
            result.samples += _per_sample(dataset, chunk, scored.index, batch.input_ids.shape, losses)
        result.loss_sum += float(losses.sum())
        result.tokens += len(losses)
        if on_batch is not None:
            on_batch(number, len(starts), result.tokens)
    return result


def _per_sample(dataset, chunk: list, index: torch.Tensor, shape, losses: torch.Tensor) -> list[dict[str, Any]]:
    """Each row's loss and scored tokens (an unpacked row is one sample)."""
    rows, width = shape
    row_of = (index // width).cpu()
    row_sums = torch.zeros(rows, dtype=torch.float64).index_add_(0, row_of, losses)
    row_counts = torch.bincount(row_of, minlength=rows)
    found = []
    for offset, row in enumerate(chunk):
        record = dataset.samples[row.segments[0][2]]
        scored_here = int(row_counts[offset])
        found.append({"line": record.line, "loss": float(row_sums[offset]) / max(scored_here, 1),
                      "tokens": scored_here})
    return found
