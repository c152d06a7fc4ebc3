"""What the trainer asks of the estimator about a run, and what it makes of the answers. The estimator sits above
the trainer (it builds its model with memfit.train.model), so the trainer is handed a `Sizing` by whoever starts it
(memfit.sizing.EstimatorSizing, from memfit.api and memfit.child) and never imports the estimator. None of it is
needed to train: a trainer without one writes no estimate, checks no --max-memory against the model, and prints no
resume flags after a guard stop."""

from __future__ import annotations

from typing import Callable, Protocol

from memfit.config import TrainConfig


class Sizing(Protocol):
    def estimate_bytes(self, resolved, config: TrainConfig, device: str, limit_bytes: int, world_size: int = 1,
                       distributed: bool = False) -> int | None:
        """The estimated peak (of one rank), for run.json; None when the estimator cannot say."""

    def limit_warnings(self, resolved, config: TrainConfig, device: str, force: bool) -> list[str]:
        """Warnings about --max-memory; a UserError when it is below micro-batch 1's peak (unless `force`)."""

    def largest_micro_batch(self, resolved, config: TrainConfig, device: str) -> Callable[[int, int], int]:
        """f(limit_bytes, below): the largest micro-batch under `below` that fits in `limit_bytes` (0: not even 1)."""


def resume_flags(limit, peak_bytes: int, estimate: int | None, micro_batch: int, effective_batch: int,
                 largest: Callable[[int, int], int]) -> str:
    """After a guard stop: what makes the resume fit (from the estimate and the peak seen), else nothing."""
    from memfit.train.checkpoint import resume_fix

    try:
        return resume_fix(limit.limit_bytes, limit.available_bytes, peak_bytes, estimate, micro_batch,
                          effective_batch, largest)
    except Exception:  # noqa: BLE001 - advice for the printed command; the stop and its checkpoint stand
        return ""
