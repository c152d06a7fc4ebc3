"""Turn tokenized samples into training rows of at most `seq_len` tokens, packed or one per sample.

Rows are never padded here: `collate` pads each batch to its own longest row, so padding costs only what the
batch needs.

What "scored" means everywhere in this module: a token whose label is not IGNORE_INDEX, at position 1 or later of
its row. The loss shifts labels (`memfit.train.losses.shift_labels`), so position 0 of a row is never a target.
Together with the IGNORE label on the first token of every later segment of a packed block, this makes a sample's
first token unscored wherever it lands, so the counts do not depend on packing.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memfit.data.formats import IGNORE_INDEX, tokenize_record
from memfit.data.jsonl import Record, read_records
from memfit.errors import UserError


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
    split = packed and kind == "text"
    stream = _TextStream(seq_len) if split else None
    pieces_to_pack: list[tuple[list[int], list[int], int]] = []
    rows: list[Row] = []
    for index, record in enumerate(records):
        sample = tokenize_record(record, tokenizer, path=path)
        if stream is not None:
            if not _scored(sample.labels) or len(sample.input_ids) < 2:
                stats.dropped_samples += 1
                continue
            rows.extend(stream.add(sample.input_ids, sample.labels, index))
            continue
        piece = _fit(sample.input_ids, sample.labels, seq_len, stats=stats)
        if piece is None:
            continue
        if packed:
            pieces_to_pack.append((*piece, index))
        else:
            rows.append(Row(*piece, [(0, len(piece[0]), index)]))
    if stream is not None:
        rows.extend(stream.flush())
        stats.split_samples = stream.split_samples
    if pieces_to_pack:
        rows.extend(best_fit_rows(pieces_to_pack, seq_len))
    if not rows:
        raise UserError(
            f"{path}: no training samples left: all {len(records):,} have nothing to score within --seq-len {seq_len}",
            hint="raise --seq-len, or shorten the prompts",
        )
    stats.rows = len(rows)
    stats.tokens = sum(len(row.input_ids) for row in rows)
    stats.scored_tokens = sum(sum(row.count_scored().scored) for row in rows)
    return Dataset(rows=rows, samples=records, stats=stats)


def _fit(input_ids: list[int], labels: list[int], seq_len: int, *,
         stats: DataStats) -> tuple[list[int], list[int]] | None:
    """A sample that stays whole (not packed plain text), cut to seq_len, or None when nothing in it would be
    scored. The start is kept: the prompt and the answer's beginning."""
    length = len(input_ids)
    if length > seq_len:
        input_ids, labels = input_ids[:seq_len], labels[:seq_len]
    if not _scored(labels):
        stats.dropped_samples += 1  # a dropped sample is only counted here, not as truncated too
        return None
    if length > seq_len:
        stats.truncated_samples += 1
        stats.truncated_tokens += length - seq_len
    return input_ids, labels


def _scored(labels: list[int]) -> int:
    return _scored_in(labels, 0, len(labels))


def _scored_in(labels: list[int], start: int, end: int) -> int:
    return sum(label != IGNORE_INDEX for label in labels[max(start, 1):end])


def _segment_labels(labels: list[int], start: int) -> list[int]:
    """A segment's labels as placed at `start` of a row: a later segment's first token is never a target, since
    predicting it from the previous sample's context teaches nothing true."""
    labels = list(labels)
    if start:
        labels[0] = IGNORE_INDEX
    return labels


class _TextStream:
    """Plain text, every row filled: documents follow each other in file order, and one that does not fit in what is
    left of a row is split there, its rest starting the next row (torchtune's `split_across_pack=True`, what
    pre-training packers do). Each piece is a segment of its own, so documents stay isolated; a split costs the
    piece's first target. A piece shorter than 2 tokens would hold no target: the row closes instead."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.row = Row([], [], [])
        self.split_samples = 0

    def add(self, input_ids: list[int], labels: list[int], sample_index: int) -> list[Row]:
        closed: list[Row] = []
        offset, pieces = 0, 0
        while offset < len(input_ids):
            start = len(self.row.input_ids)
            space = self.seq_len - start
            rest = len(input_ids) - offset
            if space < 2 and start:
                closed.extend(self.flush())
                continue
            take = min(space, rest)
            if rest - take == 1 and start:  # leave no 1-token piece (it would hold no target): 2 go to the next row
                take -= 1
                if take < 2:
                    closed.extend(self.flush())
                    continue
            self.row.input_ids.extend(input_ids[offset:offset + take])
            self.row.labels.extend(_segment_labels(labels[offset:offset + take], start))
            self.row.segments.append((start, start + take, sample_index))
            offset += take
            pieces += 1
            if len(self.row.input_ids) == self.seq_len:
                closed.extend(self.flush())
        self.split_samples += pieces > 1
        return closed

    def flush(self) -> list[Row]:
        if not self.row.input_ids:
            return []
        row, self.row = self.row, Row([], [], [])
        return [row]


def best_fit_rows(pieces: list[tuple[list[int], list[int], int]], seq_len: int) -> list[Row]:
    """Samples that must stay whole (prompt/completion, chat), packed best-fit decreasing: longest first, each into
    the open row it leaves least room in, else a new row. Rows come out in the order they were opened; the trainer
    shuffles them."""
    order = sorted(range(len(pieces)), key=lambda i: (-len(pieces[i][0]), i))
    rows: list[Row] = []
    free: list[tuple[int, int]] = []  # (room left, row number), sorted: the first with room >= n is the best fit
    for i in order:
        input_ids, labels, sample_index = pieces[i]
        n = len(input_ids)
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            _, number = free.pop(at)
        else:
            number = len(rows)
            rows.append(Row([], [], []))
        row = rows[number]
        start = len(row.input_ids)
        row.input_ids.extend(input_ids)
        row.labels.extend(_segment_labels(labels, start))
        row.segments.append((start, start + n, sample_index))
        if seq_len - len(row.input_ids) > 0:
            bisect.insort(free, (seq_len - len(row.input_ids), number))
    return rows


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'' if number == 1 else 's'}"
