"""The largest micro-batch that fits: solved on each phase's line through the traces at batch 1 and 2, then checked
by the traced estimate at the answer."""

from __future__ import annotations

import math
from dataclasses import dataclass

from memfit.config import TrainConfig
from memfit.estimate import cuts
from memfit.estimate.breakdown import Estimate, estimate_memory
from memfit.estimate.dtypes import Precision, resolve_dtypes, traced_precision
from memfit.estimate.hardware import Hardware
from memfit.estimate.peaks import PeakLines, TracePeak
from memfit.estimate.solve import largest_fitting
from memfit.models.arch import ArchInfo, arch_info


@dataclass(frozen=True)
class BatchSolve:
    batch: int  # the largest micro-batch that fits (0: not even 1)
    how: str  # "batch 1 does not fit" | "traced" (1 or 2) | "lines, checked" | "traced search"
    line_evaluations: int = 0  # estimates computed from the lines (arithmetic, no trace)
    traced_estimates: int = 0  # estimates traced at batch sizes other than 1 and 2 (the check is one), 2 cuts each


def solve_max_batch(hf_config, config: TrainConfig, hardware: Hardware, limit: int = 65536) -> BatchSolve:
    """The largest micro-batch whose estimate fits in `hardware.memory_bytes`, and how it was found.

    Batch 1 and 2 are traced (both cuts). Through them each phase's peak is a line in the batch (PeakLines),
    kept apart for the forward, loss head and layer backward; the estimate's own arithmetic puts them together
    with the terms that do not grow with the batch (weights, optimizer states, the gradients a full fine-tune
    holds at its optimizer step, a loading peak), so the total is flat where those dominate and rises where a
    phase takes over. The largest batch on that curve comes from memfit.estimate.solve (closed form where the curve
    is straight, doubling and bisection where it is not), on arithmetic alone. The traced estimate at that answer
    checks it: when it fits and no phase fell below its line there, the answer stands; otherwise the search goes on
    over traced estimates, bracketed by what is known (a phase's peak can move to another moment of the step as
    the batch grows, and the loss head's chunk grows in steps with the tokens).
    """
    budget = hardware.memory_bytes

    def at(batch: int) -> TrainConfig:
        return config.model_copy(update={"batch_size": batch})

    def traced_total(batch: int) -> int:
        return estimate_memory(hf_config, at(batch), hardware).total_bytes

    one = traced_total(1)
    if one > budget:
        return BatchSolve(0, "batch 1 does not fit")
    if limit <= 1:
        return BatchSolve(1, "traced")
    precision = traced_precision(resolve_dtypes(config.dtype, hardware.device), hardware)
    info = arch_info(hf_config)
    lines = PeakLines(cuts.traced_peaks(hf_config, info, at(1), precision, 1),
                      cuts.traced_peaks(hf_config, info, at(2), precision, 2))

    def on_lines(batch: int) -> Estimate:
        return estimate_memory(hf_config, at(batch), hardware, phases=lines.at(batch))

    solution = largest_fitting(lambda batch: on_lines(batch).total_bytes, budget, limit, known={1: one})
    answer = solution.batch
    if answer <= 2:  # the lines at 1 and 2 are the traces
        return BatchSolve(answer, "traced", solution.evaluations)

    # The check: the traced estimate at the answer (both cuts). One cut is not enough: llama-3.2-1b, full, seq
    # 2048, no checkpointing, moves its backward peak (from the moment the gradients are all there to one with
    # more activations) at batch 3 in the 4-layer cut but at batch 4 in the 2-layer cut.
    checked = estimate_memory(hf_config, at(answer), hardware)
    _record_if_on_lines(hf_config, info, config, precision, answer)
    known = {1: one, 2: on_lines(2).total_bytes, answer: checked.total_bytes}  # the lines at 2: its traces
    if checked.total_bytes > budget:  # a phase rose above its line: search below, on traces
        found = largest_fitting(traced_total, budget, limit, fits=2, over=answer, known=known)
        return BatchSolve(found.batch, "traced search", solution.evaluations, found.evaluations + 1)
    if answer >= limit:
        return BatchSolve(answer, "lines, checked", solution.evaluations, 1)
    # The answer fits. The next batch is over on the lines; it stays over unless a phase fell below its line here
    # (then it may fit).
    traced = cuts.traced_peaks(hf_config, info, at(answer), precision, answer)
    lowered = _lowered_by_shortfall(lines, traced, answer)
    if estimate_memory(hf_config, at(answer + 1), hardware, phases=lowered).total_bytes > budget:
        return BatchSolve(answer, "lines, checked", solution.evaluations, 1)
    found = largest_fitting(traced_total, budget, limit, fits=answer, known=known)
    return BatchSolve(found.batch, "traced search", solution.evaluations, found.evaluations + 1)


def _record_if_on_lines(hf_config, info: ArchInfo, config: TrainConfig, precision: Precision, answer: int) -> None:
    """When every cut's trace at `answer` is on its lines through batch 1 and 2, record it: batches up to here need
    no trace (memfit.estimate.cuts.lines_hold_to)."""
    if answer <= cuts.lines_hold_to(hf_config, info, config, precision):
        return
    at_answer = config.model_copy(update={"batch_size": answer})
    at_one = config.model_copy(update={"batch_size": 1})
    if all(cuts.trace_cut(hf_config, at_answer, precision, cut, answer)
           == cuts.cut_lines(hf_config, at_one, precision, cut).at(answer) for cut in cuts.cuts_of(hf_config, info)):
        cuts.record_lines_held(hf_config, info, at_answer, precision, answer)


def _lowered_by_shortfall(lines: PeakLines, traced: dict[str, TracePeak], answer: int) -> dict[str, TracePeak]:
    """The phases' lines at `answer + 1`, each lowered by what its trace at `answer` fell short of its line there."""
    full, following = lines.at(answer), lines.at(answer + 1)
    lowered = {}
    for phase, peak in following.items():
        held_gap = min(0, traced[phase].held - full[phase].held)
        gradient_gap = min(0, traced[phase].gradients - full[phase].gradients)
        held = max(0, peak.held + held_gap)
        lowered[phase] = TracePeak(activations=held - min(held, peak.logits), logits=min(held, peak.logits),
                                   gradients=max(0, peak.gradients + gradient_gap))
    return lowered


def max_batch_size(hf_config, config: TrainConfig, hardware: Hardware, limit: int = 65536) -> int:
    """The largest micro-batch whose estimate fits in `hardware.memory_bytes` (0 if not even 1 fits): see
    `solve_max_batch`."""
    return solve_max_batch(hf_config, config, hardware, limit).batch


def grad_accum_for(target_batch: int, micro_batch: int, num_gpus: int) -> int:
    return max(1, math.ceil(target_batch / max(1, micro_batch * num_gpus)))

