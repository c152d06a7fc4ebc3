"""Find the largest batch that is usable, in as few trials as possible.

A trial costs a model load and a dozen training steps, so the search spends them carefully. Peak memory is close
to linear in the batch at a fixed sequence length (weights, adapters and optimizer states are fixed; activations
and logits grow with every row), so:

1. the first guess is the estimator's answer (calibrated, when a profile says how far off it runs here);
2. every later guess comes from a line through what the trials measured: with one measured peak (or several
   close together, where noise swamps the slope), the estimator's slope scaled by measured/estimated at the
   largest; with peaks spread over a quarter of the range or more, a least-squares line through them;
3. each guess is clamped inside the bracket (largest usable, smallest unusable); when two guesses in a row fail
   to halve the bracket, or the line points past a batch already shown not to fit, the next step bisects
   instead, so a poor line cannot make the search much slower than plain bisection.

With a good estimator this ends in two or three trials: the guess, and the neighbour that proves it the largest.
The batches tried come from `allowed` (every integer, or powers of two when asked), so the same code does both.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Callable


@dataclass
class Outcome:
    """What the search learned at one batch size."""

    batch: int
    usable: bool
    peak_bytes: int | None = None  # measured peak (of a trial stopped at the limit: what it reached, a lower bound)


def allowed_batches(max_batch: int, powers_of_two: bool) -> list[int]:
    if powers_of_two:
        return [2**exponent for exponent in range(int(math.log2(max_batch)) + 1)]
    return list(range(1, max_batch + 1))


def _fit_line(outcomes: list[Outcome], predict: Callable[[int], int | None]) -> tuple[float, float] | None:
    """(intercept, slope) of peak bytes against batch: a least-squares line through the measured peaks; with one
    measured peak, the estimator's slope scaled by measured/estimated there; with none, the estimator's line."""
    points = sorted({o.batch: o.peak_bytes for o in outcomes if o.peak_bytes}.items())
    # Peaks of neighbouring batches differ by less than the measurement noise: a slope needs a wide base.
    if len(points) >= 2 and points[-1][0] - points[0][0] >= max(2, points[-1][0] // 4):
        count = len(points)
        mean_b = sum(b for b, _ in points) / count
        mean_p = sum(p for _, p in points) / count
        spread = sum((b - mean_b) ** 2 for b, _ in points)
        slope = sum((b - mean_b) * (p - mean_p) for b, p in points) / spread
        if slope > 0:
            return mean_p - slope * mean_b, slope
        points = points[-1:]  # noise swamped the slope (tiny batches); fall back on the estimator's
    batch, peak = points[0] if points else (1, None)
    step = max(1, batch // 2)
    here, further = predict(batch), predict(batch + step)
    if not here or not further or further <= here:
        return None
    scale = peak / here if peak else 1.0
    slope = (further - here) / step * scale
    return (peak or here) - slope * batch, slope


def largest_usable(try_batch: Callable[[int], Outcome], first_guess: int, target_bytes: int,
                   predict: Callable[[int], int | None], allowed: list[int],
                   lo: int = 0, hi: int | None = None) -> tuple[int, list[Outcome]]:
    """The largest batch in `allowed` that `try_batch` finds usable (0 if none), and the outcomes in order.

    `target_bytes` is the peak a usable batch may reach (the limit divided by 1 + margin); `lo`/`hi` are bounds
    already known (a usable batch, an unusable one), e.g. from a smaller LoRA rank or sequence length.
    """
    # Bracket as indices into `allowed`: everything at or below lo_i is usable, everything at or above hi_i is not.
    lo_i = bisect.bisect_right(allowed, lo) - 1  # -1: nothing known usable
    hi_i = len(allowed) if hi is None else bisect.bisect_left(allowed, hi)
    outcomes: list[Outcome] = []
    guess = first_guess
    slow = 0  # guided trials in a row that did not halve the bracket
    while hi_i - lo_i > 1:
        guess_i = bisect.bisect_right(allowed, max(1, guess)) - 1
        width, bracketed = hi_i - lo_i, hi_i < len(allowed)
        if guess_i >= hi_i or slow >= 2:
            # The line says a batch fits that a trial already showed does not, or it keeps creeping: bisect.
            index, guided, slow = (lo_i + hi_i) // 2, False, 0
        else:
            index, guided = max(guess_i, lo_i + 1), True
        outcome = try_batch(allowed[index])
        outcomes.append(outcome)
        if outcome.usable:
            lo_i = index
        else:
            hi_i = index
        if guided and bracketed:  # (with no failure yet there is no bracket to halve)
            slow = slow + 1 if hi_i - lo_i > width / 2 else 0
        line = _fit_line(outcomes, predict)
        if line is not None:
            intercept, slope = line
            guess = int((target_bytes - intercept) // slope)
        elif hi_i == len(allowed):
            guess = allowed[lo_i] * 2 if lo_i >= 0 else 1  # nothing to go on: double to bracket
        else:
            guess = allowed[-1] + 1  # past every bound: the next step bisects
    return (allowed[lo_i] if lo_i >= 0 else 0), outcomes
