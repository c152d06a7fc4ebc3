"""The largest batch whose memory fits a budget, for any memory curve that does not fall as the batch grows.

Where the curve is a line, two points give the answer in closed form and one more proves it (the next batch is
over). A full fine-tune's curve is flat at small batches (the optimizer step's peak does not depend on the batch)
and then rises: there the search doubles until the curve moves, then closes in on the answer by regula falsi
(Illinois variant: an end of the bracket kept twice in a row counts half, so a guess from a flat stretch cannot
creep up one batch at a time). Every probe lands strictly inside the bracket (largest batch known to fit, smallest
known not to), and when probes stop halving it the search bisects: the number of evaluations stays near
2 log2 of the answer whatever the curve, and is 2-4 on a straight one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Solution:
    batch: int  # 0 when not even the smallest batch fits
    evaluations: int  # calls of the memory function
    values: dict[int, int] = field(default_factory=dict)  # every batch evaluated -> its bytes


def largest_fitting(total: Callable[[int], int], budget: int, limit: int, *, fits: int = 1,
                    over: int | None = None, known: dict[int, int] | None = None) -> Solution:
    """The largest batch b in [fits, limit] with total(b) <= budget (fits - 1 when total(fits) > budget: 0 from 1).

    `fits`/`over` narrow the search when a caller already knows a batch that fits and one that does not; `known`
    holds values already computed (they cost no evaluation and seed the first line)."""
    values: dict[int, int] = dict(known or {})
    newest: list[int] = sorted(values)  # evaluation order: extrapolation uses the newest two points
    evaluations = 0

    def value(batch: int) -> int:
        nonlocal evaluations
        if batch not in values:
            values[batch] = total(batch)
            evaluations += 1
        if batch in newest:
            newest.remove(batch)
        newest.append(batch)
        return values[batch]

    if value(fits) > budget:
        return Solution(fits - 1, evaluations, values)
    lo = fits
    hi = limit + 1 if over is None else over  # limit + 1: past the limit, never evaluated
    widths: list[int] = []
    proved = False  # the last probe was lo + 1 because the line ended at lo, and it fit
    while hi - lo > 1:
        # Lines through the two largest batches that fit and through the two smallest that do not: where the curve
        # bends upwards both lie below it outside their points, so neither answer is too small, and on the
        # curve's last straight piece they are the answer. The smaller one is the next probe.
        fitting = sorted(batch for batch in values if batch <= lo and values[batch] <= budget)[-2:]
        overs = sorted(batch for batch in values if batch > lo and values[batch] > budget)[:2]
        lines = [_line_guess(values, *pair, budget) for pair in (fitting, overs) if len(pair) == 2]
        lines = [line for line in lines if line is not None]
        line = min(lines) if lines else None
        stalled = len(widths) >= 2 and widths[-1] * 2 > widths[-2]
        if line is not None and line <= lo and not proved:
            guess = lo + 1  # the line ends at lo: the next batch proves it
        elif overs and (line is None or stalled):
            guess = (lo + hi) // 2
        elif line is None:
            guess = 2 * lo  # flat so far: double
        else:
            guess = line
        guess = min(max(guess, lo + 1), hi - 1)
        proof = guess == lo + 1 and line is not None and line <= lo
        if value(guess) <= budget:
            lo, proved = guess, proof
        else:
            hi, proved = guess, False
        widths.append(hi - lo)
    return Solution(lo, evaluations, values)


def _line_guess(values: dict[int, int], p: int, q: int, budget: int) -> int | None:
    """The largest batch within the budget on the line through batches p and q (None: the line does not rise)."""
    rise, run = values[q] - values[p], q - p
    if rise == 0 or (rise > 0) != (run > 0):
        return None
    return q + (budget - values[q]) * run // rise
