"""A traced micro-step's peak, and its lines in the batch size: plain numbers (no torch), so an estimate can be
computed from cached traces without importing the model code."""

from __future__ import annotations

from dataclasses import dataclass

PHASES = ("forward", "head", "backward")


@dataclass(frozen=True)
class TracePeak:
    """Live bytes at the peak of one micro-step, by kind (parameters and optimizer states excluded)."""

    activations: int
    logits: int  # tensors with a vocab-sized last dimension: logits, their fp32 copy, log-softmax, their grads
    gradients: int  # parameter gradients alive at the peak

    @property
    def total(self) -> int:
        return self.activations + self.logits + self.gradients

    @property
    def held(self) -> int:
        """What the step holds above the parameter gradients."""
        return self.activations + self.logits


def peaks_to_json(phases: dict[str, TracePeak]) -> dict[str, list[int]]:
    return {phase: [peak.activations, peak.logits, peak.gradients] for phase, peak in phases.items()}


def peaks_from_json(data: dict[str, list[int]]) -> dict[str, TracePeak]:
    return {phase: TracePeak(*(int(value) for value in values)) for phase, values in data.items()}


@dataclass(frozen=True)
class PeakLines:
    """Each phase's peak as a line in the batch size (fixed + per-sequence part), through the traces at batch 1
    and 2. At a fixed sequence length every tensor a step makes either has the batch as a dimension or does not,
    so a phase's peak grows linearly in the batch as long as the peak stays at the same moment of the step. Lines
    are kept for what the step holds above the gradients and for the gradients alive at the peak (the estimate
    scales those apart); the logits' share of what is held follows its own line, kept inside what is held (it is
    for the breakdown only: the total does not depend on it)."""

    one: dict[str, TracePeak]
    two: dict[str, TracePeak]

    def at(self, batch: int) -> dict[str, TracePeak]:
        result = {}
        for phase, first in self.one.items():
            second = self.two[phase]

            def line(a: int, b: int) -> int:
                return a + (b - a) * (batch - 1)

            held = max(0, line(first.held, second.held))
            logits = min(held, max(0, line(first.logits, second.logits)))
            gradients = max(0, line(first.gradients, second.gradients))
            result[phase] = TracePeak(activations=held - logits, logits=logits, gradients=gradients)
        return result
