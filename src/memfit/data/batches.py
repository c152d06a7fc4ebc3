"""Batches of rows as tensors, and the deterministic order rows are trained in.

The order is a pure function of (seed, epoch, position), independent of the global RNG: a resumed run picks up the
exact stream it left, whatever else consumed random numbers in between.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from memfit.data.jsonl import Record
from memfit.data.packing import Row
from memfit.train.losses import IGNORE_INDEX

_SEED_STRIDE = 1_000_003  # a prime: (seed, epoch) pairs map to distinct generator seeds for any realistic epoch


@dataclass
class Batch:
    """`sample_index` numbers the distinct JSONL samples of this batch 0..n-1 (first appearance order), so a sample
    split across two rows of the batch is one entry and per-sample losses are per JSONL line. Position t holds the
    sample that token t belongs to; because the first token of every segment is labelled IGNORE (or sits at
    position 0), a scored shifted target at t always belongs to the same sample as token t, so shifting
    `sample_index` along with the labels is optional."""

    input_ids: torch.Tensor  # (B, S) long, right-padded with pad_id to the batch's longest row
    attention_mask: torch.Tensor  # (B, S) long, 0 on padding
    labels: torch.Tensor  # (B, S) long, unshifted, IGNORE_INDEX on padding
    sample_index: torch.Tensor  # (B, S) long: index into the per-sample arrays below, -1 on padding
    auth_weight: torch.Tensor  # (n,) float32, 0.0 where the sample has none
    prov_entropy: torch.Tensor  # (n,) float32, 0.0 where the sample has none
    num_tokens: int  # non-pad tokens
    sample_ids: list[int] = field(default_factory=list)  # (n,) the Dataset.samples index of each entry

    def to(self, device: torch.device | str) -> Batch:
        moved = {name: getattr(self, name).to(device) for name in _TENSORS}
        return Batch(**moved, num_tokens=self.num_tokens, sample_ids=list(self.sample_ids))


_TENSORS = ("input_ids", "attention_mask", "labels", "sample_index", "auth_weight", "prov_entropy")


def collate(rows: list[Row], samples: list[Record], pad_id: int) -> Batch:
    """Pad `rows` to the longest one; `samples` is `Dataset.samples`, for the per-sample distrust fields."""
    if not rows:
        raise ValueError("collate needs at least one row")
    width = max(len(row.input_ids) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    sample_index = torch.full((len(rows), width), -1, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    local: dict[int, int] = {}  # Dataset sample index -> this batch's entry
    for b, row in enumerate(rows):
        length = len(row.input_ids)
        input_ids[b, :length] = torch.tensor(row.input_ids, dtype=torch.long)
        labels[b, :length] = torch.tensor(row.labels, dtype=torch.long)
        attention_mask[b, :length] = 1
        for start, end, index in row.segments:
            sample_index[b, start:end] = local.setdefault(index, len(local))
    sample_ids = list(local)
    auth_weight = torch.tensor([samples[i].auth_weight or 0.0 for i in sample_ids], dtype=torch.float32)
    prov_entropy = torch.tensor([samples[i].prov_entropy or 0.0 for i in sample_ids], dtype=torch.float32)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        sample_index=sample_index,
        auth_weight=auth_weight,
        prov_entropy=prov_entropy,
        num_tokens=int(attention_mask.sum()),
        sample_ids=sample_ids,
    )


def epoch_order(num_rows: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(num_rows), the same for the same (num_rows, seed, epoch) on every run."""
    return list(_order(num_rows, seed, epoch))


@functools.lru_cache(maxsize=4)
def _order(num_rows: int, seed: int, epoch: int) -> tuple[int, ...]:
    # Cached: step_rows asks for the same epoch every step. A tuple, so no caller can alter the cached order.
    generator = torch.Generator().manual_seed((seed * _SEED_STRIDE + epoch) % 2**64)
    return tuple(torch.randperm(num_rows, generator=generator).tolist())


def step_rows(num_rows: int, seed: int, start: int, count: int) -> list[int]:
    """Row indices at positions [start, start + count) of the training stream: epoch 0's order, then epoch 1's..."""
    if num_rows <= 0:
        raise ValueError(f"num_rows must be positive, got {num_rows}")
    if start < 0 or count < 0:
        raise ValueError(f"start and count must be >= 0, got {start} and {count}")
    return [_order(num_rows, seed, p // num_rows)[p % num_rows] for p in range(start, start + count)]
