"""Batches of rows as tensors, and the deterministic order rows are trained in.

The order is a pure function of (seed, epoch, position), independent of the global RNG: a resumed run picks up the
exact stream it left, whatever else consumed random numbers in between. `RowOrder` can also group rows of similar
length into the same batch, so unpacked data spends few tokens on padding.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from memfit.data.formats import IGNORE_INDEX
from memfit.data.jsonl import Record
from memfit.data.packing import Row

_SEED_STRIDE = 1_000_003  # a prime: (seed, epoch) pairs map to distinct generator seeds for any realistic epoch


@dataclass
class Batch:
    """`sample_index` numbers the distinct JSONL samples of this batch 0..n-1 (first appearance order), so a sample
    split across two rows of the batch is one entry and per-sample losses are per JSONL line. Position t holds the
    sample that token t belongs to; because the first token of every segment is labelled IGNORE (or sits at
    position 0), a scored shifted target at t always belongs to the same sample as token t, so shifting
    `sample_index` along with the labels is optional.

    `position_ids` restart at 0 at every segment start and again where the padding begins. Passed with
    `attention_mask=None` (and no KV cache), transformers reads the restarts as packed-sequence boundaries and keeps
    each segment from attending to the others (see `memfit.models.attention`); the padding tail becomes a sequence
    of its own, which no real token can see under causal attention."""

    input_ids: torch.Tensor  # (B, S) long, right-padded with pad_id to the batch's longest row
    attention_mask: torch.Tensor  # (B, S) long, 0 on padding
    position_ids: torch.Tensor  # (B, S) long: 0, 1, ... within each segment, and again over the padding
    labels: torch.Tensor  # (B, S) long, unshifted, IGNORE_INDEX on padding
    sample_index: torch.Tensor  # (B, S) long: index into the per-sample arrays below, -1 on padding
    auth_weight: torch.Tensor  # (n,) float32, 0.0 where the sample has none
    prov_entropy: torch.Tensor  # (n,) float32, 0.0 where the sample has none
    num_tokens: int  # non-pad tokens
    sample_ids: list[int] = field(default_factory=list)  # (n,) the Dataset.samples index of each entry
    packed: bool = False  # some row holds more than one segment: only then can samples attend to each other

    def to(self, device: torch.device | str) -> Batch:
        moved = {name: getattr(self, name).to(device) for name in _TENSORS}
        return Batch(**moved, num_tokens=self.num_tokens, sample_ids=list(self.sample_ids), packed=self.packed)


_TENSORS = ("input_ids", "attention_mask", "position_ids", "labels", "sample_index", "auth_weight", "prov_entropy")


def pad_token_id(tokenizer) -> int:
    """The id padding uses: the tokenizer's pad token, else its end-of-text token (pads are never scored)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def collate(rows: list[Row], samples: list[Record], pad_id: int) -> Batch:
    """Pad `rows` to the longest one; `samples` is `Dataset.samples`, for the per-sample distrust fields."""
    if not rows:
        raise ValueError("collate needs at least one row")
    width = max(len(row.input_ids) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    sample_index = torch.full((len(rows), width), -1, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    starts = torch.zeros((len(rows), width), dtype=torch.bool)  # where a segment (or the padding) begins
    local: dict[int, int] = {}  # Dataset sample index -> this batch's entry
    for b, row in enumerate(rows):
        length = len(row.input_ids)
        input_ids[b, :length] = torch.tensor(row.input_ids, dtype=torch.long)
        labels[b, :length] = torch.tensor(row.labels, dtype=torch.long)
        attention_mask[b, :length] = 1
        starts[b, length:length + 1] = True
        for start, end, index in row.segments:
            sample_index[b, start:end] = local.setdefault(index, len(local))
            starts[b, start] = True
    # Each position minus the index where its piece began (the latest start at or before it; column 0 counts as one).
    column = torch.arange(width).expand(len(rows), width)
    position_ids = column - torch.where(starts, column, 0).cummax(dim=1).values
    sample_ids = list(local)
    auth_weight = torch.tensor([samples[i].auth_weight or 0.0 for i in sample_ids], dtype=torch.float32)
    prov_entropy = torch.tensor([samples[i].prov_entropy or 0.0 for i in sample_ids], dtype=torch.float32)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        labels=labels,
        sample_index=sample_index,
        auth_weight=auth_weight,
        prov_entropy=prov_entropy,
        num_tokens=int(attention_mask.sum()),
        sample_ids=sample_ids,
        packed=any(len(row.segments) > 1 for row in rows),
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


_MEGABATCH = 50  # batches per length-sorted megabatch, as in transformers' LengthGroupedSampler
_GROUP_SALT = 0x9E3779B97F4A7C15  # keeps the batch shuffle's generator apart from the row permutation's


class RowOrder:
    """The training stream's row order, optionally grouped by length: `rows(start, count)` is the slice
    [start, start + count) of epoch 0's order, then epoch 1's, ...

    grouped=False is `step_rows`. grouped=True keeps each epoch's seeded permutation but cuts it into megabatches of
    `batch * 50` rows, sorts each by length (longest first), cuts that into batches of `batch` rows and shuffles
    those within the megabatch, so a batch holds rows of similar length and pads little. Epoch 0 starts with the
    batch of the longest row: if anything runs out of memory, it does at step 1.

    The batches are cut on the stream's grid of multiples of `batch`, also when the row count is not a multiple of
    it: then the first rows of an epoch complete the batch the previous epoch's last rows began, and the two
    leftovers share one batch. The trainer passes the step's row count (batch size x grad accum), which a resume
    cannot change, and splits each step into micro-batches longest first.
    """

    def __init__(self, lengths: Sequence[int], seed: int, batch: int, grouped: bool):
        if not lengths:
            raise ValueError("RowOrder needs at least one row")
        if batch < 1:
            raise ValueError(f"batch must be positive, got {batch}")
        self.lengths = tuple(int(length) for length in lengths)
        self.seed = seed
        self.batch = batch
        self.grouped = grouped
        self._epochs: OrderedDict[int, tuple[int, ...]] = OrderedDict()  # LRU: a step spans at most two epochs

    def rows(self, start: int, count: int) -> list[int]:
        """Row indices at positions [start, start + count) of the training stream."""
        if start < 0 or count < 0:
            raise ValueError(f"start and count must be >= 0, got {start} and {count}")
        n = len(self.lengths)
        return [self.epoch(p // n)[p % n] for p in range(start, start + count)]

    def epoch(self, epoch: int) -> tuple[int, ...]:
        """Epoch `epoch`'s order: a permutation of range(len(lengths))."""
        if not self.grouped:
            return _order(len(self.lengths), self.seed, epoch)
        order = self._epochs.get(epoch)
        if order is None:
            order = self._epochs[epoch] = self._grouped(epoch)
            if len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        else:
            self._epochs.move_to_end(epoch)
        return order

    def _grouped(self, epoch: int) -> tuple[int, ...]:
        n, size, lengths = len(self.lengths), self.batch, self.lengths
        perm = _order(n, self.seed, epoch)
        # Rows that fill the batch the previous epoch's leftover began: they keep the permutation's order.
        head = min((-epoch * n) % size, n)
        body = perm[head:]
        mega = size * _MEGABATCH
        cuts = list(range(0, len(body), mega))
        if len(cuts) > 1 and len(body) - cuts[-1] < size:
            cuts.pop()  # a last megabatch smaller than one batch joins the one before, so it sorts with it
        generator = torch.Generator().manual_seed((self.seed * _SEED_STRIDE + epoch) % 2**64 ^ _GROUP_SALT)
        groups: list[tuple[int, ...]] = []
        for begin, end in zip(cuts, cuts[1:] + [len(body)]):
            chunk = sorted(body[begin:end], key=lambda row: -lengths[row])  # stable: ties keep the permutation
            batches = [tuple(chunk[i : i + size]) for i in range(0, len(chunk), size)]
            # Only the epoch's very last batch can be short; it stays last, on the grid, for the next epoch's head.
            full = len(batches) - (len(batches[-1]) < size)
            shuffle = torch.randperm(full, generator=generator).tolist()
            groups.extend([batches[i] for i in shuffle] + batches[full:])
        if epoch == 0:
            # A full batch, so the grid holds; one exists whenever there are two batches, and it has a longest row
            # since each megabatch's first batch holds that megabatch's longest rows.
            top = max(lengths)
            first = next((i for i, group in enumerate(groups)
                          if len(group) == size and max(lengths[row] for row in group) == top), 0)
            groups.insert(0, groups.pop(first))
        return tuple(perm[:head]) + tuple(row for group in groups for row in group)
