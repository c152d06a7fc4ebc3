"""The estimator's answers to what the trainer asks (memfit.train.sizing.Sizing): its figure for run.json, the check
of --max-memory before anything loads, and the largest micro-batch a resume after a guard stop fits. The entry
points that start a trainer (memfit.api.run_training, a probe trial in memfit.child) hand it this: the trainer sits
below the estimator, which builds its model with memfit.train.model, so it never imports the estimator itself.
None of it is needed to train: an estimator that cannot read the model leaves the run unchecked."""

from __future__ import annotations

from typing import Callable

from memfit.config import TrainConfig
from memfit.errors import UserError


class EstimatorSizing:
    """memfit.estimate, as the trainer's Sizing. The estimator is imported on first use: a run that never asks
    (no --max-memory, no guard stop) pays for it only when run.json is first written."""

    def estimate_bytes(self, resolved, config: TrainConfig, device: str, limit_bytes: int, world_size: int = 1,
                       distributed: bool = False) -> int | None:
        """The estimated peak; several processes: the estimate of one rank (--num-gpus world --zero N --offload),
        what each measures. None when the estimator cannot say (the estimate is context for the report)."""
        from memfit.distributed.engines import estimated_sharding
        from memfit.estimate.memory import Hardware, estimate_memory

        try:
            zero, engine = estimated_sharding(config) if distributed else (0, "deepspeed")
            hardware = Hardware(device=device, memory_bytes=limit_bytes, num_gpus=world_size, zero=zero,
                                offload=config.offload if distributed else "none", engine=engine)
            return estimate_memory(resolved.config, config, hardware, resolved.name).total_bytes
        except Exception:  # noqa: BLE001 - training does not depend on it
            return None

    def limit_warnings(self, resolved, config: TrainConfig, device: str, force: bool) -> list[str]:
        """--max-memory below the estimated peak of micro-batch 1: refused (UserError) before anything loads or is
        written (unless --force); above all the memory the device has: a warning (the guard would never trigger).
        In the training process (which imports torch anyway), not in a supervisor that lives as long as the run."""
        from memfit.estimate.limit import batch_one_estimate, check_limit

        try:
            needed = batch_one_estimate(resolved.config, config, device)
        except UserError:
            raise
        except Exception:  # noqa: BLE001 - the estimator cannot read this model: the run goes on unchecked
            needed = None
        return check_limit(config.max_memory, needed, device, force).warnings

    def largest_micro_batch(self, resolved, config: TrainConfig, device: str) -> Callable[[int, int], int]:
        """f(limit_bytes, below): the largest micro-batch under `below` whose estimate fits in `limit_bytes` (0: not
        even 1)."""

        def largest(limit_bytes: int, below: int) -> int:
            from memfit.estimate.memory import Hardware, solve_max_batch

            hardware = Hardware(device=device, memory_bytes=limit_bytes)
            return solve_max_batch(resolved.config, config, hardware, limit=max(1, below - 1)).batch

        return largest
