"""Turn tokenized samples into training rows of at most `seq_len` tokens, packed or one per sample.

Rows are never padded here: `collate` pads each batch to its own longest row, so padding costs only what the
batch needs.

What "scored" means everywhere in this module: a token whose label is not IGNORE_INDEX, at position 1 or later of
its row. The loss shifts labels (`memfit.train.losses.shift_labels`), so position 0 of a row is never a target.
Together with the IGNORE label on the first token of every later segment of a packed block, this makes a sample's
first token unscored wherever it lands, so the counts do not depend on packing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memfit.data.formats import tokenize_record
from memfit.data.jsonl import Record, read_records
from memfit.errors import UserError
from memfit.train.losses import IGNORE_INDEX


@dataclass
class Row:
    """One training row (a block when packed)."""

    input_ids: list[int]
    labels: list[int]
    segments: list[tuple[int, int, int]]  # (start, end, sample_index): token spans; sample_index into Dataset.samples
    scored: list[int] = field(default_factory=list)  # scored labels of each segment (set by count_scored)

    def count_scored(self) -> "Row":
        """Count each segment's scored labels once, at build time: every training step needs them."""
        self.scored = [_scored_in(self.labels, start, end) for start, end, _ in self.segments]
        return self


@dataclass
class DataStats:
    path: str
    kind: str
    records: int
    rows: int
    packed: bool
    seq_len: int
    tokens: int = 0  # real (non-pad) tokens over all rows
    scored_tokens: int = 0  # labels != IGNORE at row positions >= 1 (see the module docstring)
    truncated_samples: int = 0  # kept, but cut to seq_len (the end is lost)
    truncated_tokens: int = 0  # tokens cut off those samples
    split_samples: int = 0  # long text samples split across rows when packing (nothing lost)
    dropped_samples: int = 0  # left with no scored token (after truncation): in no row at all

    def summary(self) -> str:
        layout = "packed" if self.packed else "one sample per row"
        text = (
            f"{_count(self.records, 'sample')} → {_count(self.rows, 'row')} of ≤{self.seq_len} tokens ({layout}), "
            f"{self.tokens:,} tokens ({self.scored_tokens:,} scored)"
        )
        if self.split_samples:
            text += f"; {self.split_samples:,} split across rows"
        if self.truncated_samples:
            text += f"; {self.truncated_samples:,} truncated ({self.truncated_tokens:,} tokens dropped)"
        if self.dropped_samples:
            text += f"; {self.dropped_samples:,} dropped (nothing left to score)"
        return text


@dataclass
class Dataset:
    rows: list[Row]
    samples: list[Record]  # every record of the file, dropped ones included: indexable by sample_index
    stats: DataStats


def build_dataset(
    path: str | Path,
    tokenizer: Any,
    seq_len: int,
    packing: bool | None = None,
    require_distrust: bool = False,
) -> Dataset:
    """Read, validate, tokenize and lay out a JSONL file. `packing=None` packs `text` data only: prompt/completion
    and chat samples are usually short and uneven, and truncating one at a block edge would cut its answer."""
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {seq_len}", hint="a row needs a token and its successor")
    records = read_records(path, require_distrust=require_distrust)
    kind = records[0].kind
    packed = kind == "text" if packing is None else packing
    stats = DataStats(path=str(path), kind=kind, records=len(records), rows=0, packed=packed, seq_len=seq_len)
    builder = _Packer(seq_len) if packed else None
    rows: list[Row] = []
    for index, record in enumerate(records):
        sample = tokenize_record(record, tokenizer, path=path)
        pieces = _fit(sample.input_ids, sample.labels, seq_len, split=packed and kind == "text", stats=stats)
        if pieces is None:
            continue
        for input_ids, labels in pieces:
            if builder is None:
                rows.append(Row(input_ids, labels, [(0, len(input_ids), index)]))
            else:
                rows.extend(builder.add(input_ids, labels, index))
    if builder is not None:
        rows.extend(builder.flush())
    if not rows:
        raise UserError(
            f"{path}: no training samples left: all {len(records):,} have nothing to score within --seq-len {seq_len}",
            hint="raise --seq-len, or shorten the prompts",
        )
    stats.rows = len(rows)
    stats.tokens = sum(len(row.input_ids) for row in rows)
    stats.scored_tokens = sum(sum(row.count_scored().scored) for row in rows)
    return Dataset(rows=rows, samples=records, stats=stats)


def _fit(
    input_ids: list[int], labels: list[int], seq_len: int, *, split: bool, stats: DataStats
) -> list[tuple[list[int], list[int]]] | None:
    """The sample as pieces of at most seq_len tokens, or None when nothing in it would be scored."""
    length = len(input_ids)
    if length <= seq_len:
        pieces = [(input_ids, labels)]
    elif split:
        # Plain text has no answer to lose: every chunk is trained on. Only each chunk's first token goes
        # unscored, since it starts a row.
        pieces = [(input_ids[i : i + seq_len], labels[i : i + seq_len]) for i in range(0, length, seq_len)]
    else:
        pieces = [(input_ids[:seq_len], labels[:seq_len])]  # keep the start: the prompt and the answer's beginning
    if not any(_scored(piece_labels) for _, piece_labels in pieces):
        stats.dropped_samples += 1  # a dropped sample is only counted here, not as truncated too
        return None
    if len(pieces) > 1:
        stats.split_samples += 1
    elif length > seq_len:
        stats.truncated_samples += 1
        stats.truncated_tokens += length - seq_len
    return pieces


def _scored(labels: list[int]) -> int:
    return _scored_in(labels, 0, len(labels))


def _scored_in(labels: list[int], start: int, end: int) -> int:
    return sum(label != IGNORE_INDEX for label in labels[max(start, 1):end])


class _Packer:
    """Greedy, in file order: a piece joins the current block if it fits, else the block is closed."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.row = Row([], [], [])

    def add(self, input_ids: list[int], labels: list[int], sample_index: int) -> list[Row]:
        closed = self.flush() if len(self.row.input_ids) + len(input_ids) > self.seq_len else []
        start = len(self.row.input_ids)
        labels = list(labels)
        if start:
            # Predicting this sample's first token from the previous sample's context teaches nothing true.
            labels[0] = IGNORE_INDEX
        self.row.input_ids.extend(input_ids)
        self.row.labels.extend(labels)
        self.row.segments.append((start, start + len(input_ids), sample_index))
        return closed

    def flush(self) -> list[Row]:
        if not self.row.input_ids:
            return []
        row, self.row = self.row, Row([], [], [])
        return [row]


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'' if number == 1 else 's'}"
