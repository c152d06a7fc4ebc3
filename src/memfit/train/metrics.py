"""The steps' metrics, held until their losses are read back from the device in one host sync.

Reading a loss back waits for the device to finish the step; on CUDA/MPS that is done about every LOG_INTERVAL_S
(CPU ops have run by the time they return, so there it costs nothing and every step is logged at once), or every
`--log-every` steps. `StepLog.flush` turns the held steps into StepEnd events, in order.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from memfit.events import StepEnd

LOG_INTERVAL_S = 0.5
RECENT_LOSSES = 50  # kept (and checkpointed) for the run's end; the average shown is over the last AVERAGE_OVER
AVERAGE_OVER = 20


class StepLog:
    def __init__(self, total_steps: int, log_every: int, every_step: bool, add_distrust: bool):
        self.total_steps = total_steps
        self.log_every = log_every  # 0: by time (every step where `every_step`: on CPU)
        self.every_step = every_step
        self.add_distrust = add_distrust  # --loss distrust --distrust-mode add: the loss shown includes the term
        self.recent_losses: list[float] = []
        self.step_times: list[float] = []
        self.pending: list[dict[str, Any]] = []  # finished steps whose loss is still on the device
        self.last_flush = time.perf_counter()

    def hold(self, stats: dict[str, Any], step: int, elapsed: float, sample, lr: float, micro_batch: int) -> bool:
        """Hold a finished step; True when the held steps are due to be read back."""
        self.step_times = (self.step_times + [elapsed])[-AVERAGE_OVER:]
        self.pending.append({**stats, "step": step, "elapsed": elapsed, "sample": sample, "lr": lr,
                             "micro_batch": micro_batch})
        every = self.log_every
        due = (step % every == 0 if every else
               self.every_step or time.perf_counter() - self.last_flush >= LOG_INTERVAL_S)
        return due or step >= self.total_steps

    def flush(self) -> list[StepEnd]:
        """The held steps' StepEnd events, their losses read back in one host sync."""
        if not self.pending:
            return []
        pending, self.pending = self.pending, []
        self.last_flush = time.perf_counter()
        nan = torch.full((), float("nan"), device=pending[0]["loss_sum"].device)
        values = torch.stack([torch.stack([held["loss_sum"].float(),
                                           (held["grad_norm"] if held["grad_norm"] is not None else nan).float()])
                              for held in pending]).tolist()  # the one read-back
        # The first step of a process pays for warm-up; leave it out of the rate once there are others.
        times = self.step_times[1:] if len(self.step_times) > 1 else self.step_times
        steps_per_s = len(times) / max(sum(times), 1e-9)
        return [self._step_end(held, ce, grad_norm, steps_per_s) for held, (ce, grad_norm) in zip(pending, values)]

    def _step_end(self, held: dict[str, Any], ce: float, grad_norm: float, steps_per_s: float) -> StepEnd:
        loss = ce + held["distrust_term"] if self.add_distrust else ce
        self.recent_losses = (self.recent_losses + [loss])[-RECENT_LOSSES:]
        window = self.recent_losses[-AVERAGE_OVER:]
        sample, elapsed = held["sample"], held["elapsed"]
        memory = {key: value for key, value in vars(sample).items() if key != "time" and value is not None}
        return StepEnd(
            step=held["step"], total_steps=self.total_steps, loss=loss, avg_loss=sum(window) / len(window),
            ce=ce, lr=held["lr"], grad_norm=None if math.isnan(grad_norm) else grad_norm,
            tokens=held["tokens"], step_time_s=elapsed, tokens_per_s=held["tokens"] / max(elapsed, 1e-9),
            steps_per_s=steps_per_s, eta_s=(self.total_steps - held["step"]) / steps_per_s,
            micro_batch=held["micro_batch"], grad_accum=held["micro_batches"],
            watched_bytes=sample.window_peak_bytes or sample.watched_bytes, memory=memory,
            distrust_term=held["distrust_term"])
