"""One optimizer step: its micro-batches on the engine (memfit.distributed.engine), the safe points where a stop is
honoured, and the recovery from running out of memory (memfit.train.loop's docstring tells the whole story).

Safe points (`SafePoints`): before every micro-batch and at every step end; with several processes each is an
agreement of the ranks (memfit.distributed.collective), so every rank takes a stop, an OOM recovery or an interrupt
at the same point. Inside a micro-batch the guard's stop is honoured at decoder-layer entries (`layer_stop_hook`),
where the engine lets one rank leave a forward pass alone.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from memfit import faults
from memfit.distributed.collective import Decision
from memfit.distributed.ranks import shard_rows
from memfit.errors import OutOfMemoryError
from memfit.events import Notice, OomRecovered
from memfit.models.attention import runs_by_segment
from memfit.train.validation import model_inputs


class StepAborted(Exception):
    """A stop was requested between micro-batches, or inside one at a decoder layer's entry (then the message says
    where): the step is dropped, the checkpoint holds the one before."""


class ShardedOom(Exception):
    """Out of memory inside a micro-batch of an engine whose forward/backward hold collectives."""


class OomAgreed(Exception):
    """Several processes: a rank ran out of memory in this step; every rank drops the step and retries it smaller."""


def layer_stop_hook(running, guard, index: int, layers: int) -> Callable[..., None]:
    """The forward pre-hook on decoder layer `index`: the step abort when the guard has asked to stop and a
    training micro-batch is running (`running.in_micro_batch`; two attribute reads: no lock, no call, no syscall)."""

    def before_layer(module, args) -> None:
        if guard.stop_now and running.in_micro_batch is not None:
            step, _, micro_batch = running.in_micro_batch
            raise StepAborted(f"step {step} cut short inside micro-batch {micro_batch}, before decoder layer "
                              f"{index + 1} of {layers}")

    return before_layer


def torch_rng_state(device: str) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    cuda = (torch.cuda.get_rng_state_all() if device == "cuda" and torch.cuda.is_initialized() else None)
    return torch.get_rng_state(), cuda


def set_torch_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class SafePoints:
    """Where a stop is honoured: this process's own stop request (the guard's, a signal's), or with several
    processes the ranks' agreement on theirs."""

    def __init__(self, ranks, guard, agreement, threshold: float, interrupted: Callable[[], str | None],
                 emit: Callable[[Any], None]):
        self.ranks, self.guard, self.agreement, self.threshold = ranks, guard, agreement, threshold
        self.interrupted, self.emit = interrupted, emit
        self.decision = Decision()  # what the ranks last agreed (one process: its own flags)
        self._warned_rank = False

    def should_stop(self) -> bool:
        return self.guard.stop_requested or self.interrupted() is not None

    def stop_agreed(self) -> bool:
        """The step-end safe point: this process's own stop request, or, with several, whether any rank has one."""
        if not self.ranks.distributed:
            return self.should_stop()
        return self.agree().stop

    def agree(self, failure: str | None = None) -> Decision:
        """One agreement of the ranks (memfit.distributed.collective); rank 0 says once when another rank's memory
        reached its threshold (each rank's own guard events stay with it)."""
        guard = self.guard
        self.decision = self.agreement.agree(stop=guard.stop_requested, oom=failure is not None,
                                             interrupted=self.interrupted() is not None,
                                             warn=guard.peak_watched_bytes >= guard.threshold_bytes,
                                             watched_bytes=guard.peak_watched_bytes)
        warn_rank = self.decision.warn_rank
        if warn_rank not in (None, self.ranks.rank) and not self._warned_rank:
            self._warned_rank = True
            self.emit(Notice(f"rank {warn_rank} reached {self.threshold:.0%} of its memory limit (the highest "
                             f"rank's peak so far: {self.decision.max_watched_bytes / 1024**3:.2f} GB)", "warning"))
        return self.decision

    def agree_in_step(self, failure: str | None = None) -> None:
        """A safe point inside a step with several processes: raises when any rank ran out of memory (all retry the
        step smaller) or asks to stop (all drop the step)."""
        decision = self.agree(failure)
        if decision.oom_rank is not None:
            raise OomAgreed(failure or f"on rank {decision.oom_rank}")
        if decision.stop:
            raise StepAborted

    def before_micro_batch(self, number: int) -> None:
        if self.ranks.distributed:
            if number:  # before micro-batch 0 the loop's step-end agreement was just made
                self.agree_in_step()
        elif self.should_stop():
            raise StepAborted

    def how_it_stopped(self) -> tuple[bool, bool]:
        """(interrupted, stopped by the guard): several processes, what they agreed, so every rank ends the same."""
        if self.ranks.distributed:
            return self.decision.interrupted_rank is not None, self.decision.stop_rank is not None
        return self.interrupted() is not None, self.guard.stop_requested

    def at_end(self, peak_rss_bytes: int, limit_bytes: int) -> tuple[list[dict] | None, str | None, str | None]:
        """Several processes: every rank's peaks for run.json, and the stop reason and signal of the rank that had
        one (rank 0 tells it); one process: None and its own."""
        stop_reason, signal_name = self.guard.stop_reason, self.interrupted()
        if not self.ranks.distributed:
            return None, stop_reason, signal_name
        per_rank = self.agreement.gather({
            "rank": self.ranks.rank, "peak_watched_bytes": self.guard.peak_watched_bytes,
            "peak_rss_bytes": peak_rss_bytes, "limit_bytes": limit_bytes, "stop_reason": stop_reason,
            "stop_limit": self.guard.stop_limit, "interrupted": signal_name})
        if self.decision.stop_rank is not None:
            stop_reason = f"rank {self.decision.stop_rank}: {per_rank[self.decision.stop_rank]['stop_reason']}"
        if self.decision.interrupted_rank is not None:
            signal_name = (f"{per_rank[self.decision.interrupted_rank]['interrupted']} on rank "
                           f"{self.decision.interrupted_rank}")
        return per_rank, stop_reason, signal_name


class StepRunner:
    """Runs optimizer steps on the engine; holds the micro-batch size (halved by an out-of-memory recovery) and
    the micro-batch in flight (read by the decoder layers' hooks)."""

    def __init__(self, engine, data, config, precision, safe: SafePoints, scheduler, emit: Callable[[Any], None],
                 head=None, position_packing: bool = True, trial: bool = False, output_dir=None):
        self.engine, self.data, self.config, self.precision = engine, data, config, precision
        self.safe, self.scheduler, self.emit = safe, scheduler, emit
        self.head, self.position_packing, self.trial, self.output_dir = head, position_packing, trial, output_dir
        self.by_segment = runs_by_segment(getattr(engine, "model", None))  # attention by segment: pass the bounds
        self.micro_batch = config.batch_size
        self.effective_batch = config.batch_size * config.grad_accum  # per rank
        self.recoveries = 0
        self.step = 0  # the steps finished before the one running
        # The training micro-batch running now, (step, attempt, micro-batch), 1-based; None outside one (evaluation,
        # checkpoints). The layer hooks act only inside one.
        self.in_micro_batch: tuple[int, int, int] | None = None
        self.layer_count = 0  # decoder layers with hooks (faults fire there instead of before the forward)

    def run(self, step: int, rows_index: list[int], last_checkpoint=None) -> dict[str, Any] | str:
        """Step `step + 1`: its stats, or "aborted" / "oom" when it could not finish."""
        from memfit.guard import is_out_of_memory, release_memory

        self.step, attempt = step, 0
        # The torch RNG as the step began (dropout draws from it): a dropped step puts it back, so the checkpoint
        # written after it, and a retry after an OOM, start the step from the same state as an uninterrupted run.
        # Only torch's: nothing in a step draws from Python's or numpy's, whose states cost 7-40x more to copy.
        rng = torch_rng_state(self.engine.device_name)
        while True:
            failure, cut_short = None, None
            try:
                return self.train_step(rows_index, attempt)
            except StepAborted as aborted:
                failure, cut_short = "aborted", (str(aborted) or None)
            except OomAgreed as agreed:
                failure = str(agreed)
            except ShardedOom as oom:
                raise self._unrecoverable(oom, last_checkpoint) from None
            except Exception as error:  # noqa: BLE001 - only out-of-memory errors are handled, the rest re-raised
                if not is_out_of_memory(error):
                    raise
                failure = " ".join(str(error).split())[:200]
            # Outside the except block: the traceback (and the activations its frames hold) is gone by now.
            self.engine.drop_gradients()
            release_memory()
            set_torch_rng_state(rng)
            if failure == "aborted":
                if cut_short:
                    self.emit(Notice(f"{cut_short}: {self.safe.guard.stop_reason or 'stop requested'}; the step is "
                                     "dropped (the checkpoint holds the one before)", "warning"))
                return "aborted"
            if self.micro_batch == 1 or self.trial:
                self.emit(Notice(f"out of memory at step {step + 1} with micro-batch {self.micro_batch}: "
                                 f"{failure}", "warning"))
                return "oom"
            attempt += 1
            self._halve_micro_batch(failure)

    def _unrecoverable(self, oom: ShardedOom, last_checkpoint) -> OutOfMemoryError:
        config = self.config
        return OutOfMemoryError(
            f"out of memory on rank {self.safe.ranks.rank} at step {self.step + 1} with micro-batch "
            f"{self.micro_batch} under --distributed {config.distributed} ({oom}): not recoverable in the process "
            "(the other ranks may wait in a collective), the launcher ends them",
            hint=f"resume from the last checkpoint with a smaller --batch-size (torchrun --max-restarts restarts by "
                 f"itself); last: {last_checkpoint or 'none yet'}")

    def _halve_micro_batch(self, failure: str) -> None:
        self.micro_batch = max(1, self.micro_batch // 2)
        self.recoveries += 1
        accum = math.ceil(self.effective_batch / self.micro_batch)
        self.emit(OomRecovered(self.step + 1, self.micro_batch, accum, self.recoveries,
                               f"out of memory at step {self.step + 1}: retrying the same {self.effective_batch} "
                               f"samples as {accum} micro-batches of {self.micro_batch} ({failure})"))

    def train_step(self, rows_index: list[int], attempt: int) -> dict[str, Any]:
        """One optimizer step. Its loss and gradient norm stay on the device (no host sync here)."""
        from memfit.train.objective import step_objective

        dataset, ranks = self.data.dataset, self.safe.ranks
        # Longest first: micro-batches of similar lengths pad less when the step is split (accumulation, OOM).
        rows = sorted((dataset.rows[i] for i in rows_index), key=lambda row: -len(row.input_ids))
        # Over all ranks' rows: the token weights sum to 1 over the global step, so the ranks' losses (and
        # gradients) add up to one process's with the whole batch.
        objective = step_objective(rows, dataset.samples, self.config)
        tokens_all = sum(len(row.input_ids) for row in rows)
        if ranks.distributed:
            mine = shard_rows(rows_index, self.data.row_length, ranks.rank, ranks.world_size)
            rows = sorted((dataset.rows[i] for i in mine), key=lambda row: -len(row.input_ids))
        chunks = [rows[i:i + self.micro_batch] for i in range(0, len(rows), self.micro_batch)]
        loss_sum, tokens, failure = self._micro_batches(chunks, objective, attempt)
        self.engine.end_step(loss_sum, failure, self.safe.agree_in_step)  # may raise: the ranks drop the step
        max_norm = self.config.max_grad_norm
        grad_norm = self.engine.clip(max_norm) if max_norm else None
        self.engine.optimizer_step()
        self.scheduler.step()
        faults.maybe_leak()
        return {"loss_sum": loss_sum, "tokens": tokens_all if ranks.distributed else tokens,
                "micro_batches": len(chunks), "grad_norm": grad_norm, "distrust_term": objective.distrust_term}

    def _micro_batches(self, chunks: list, objective, attempt: int) -> tuple[torch.Tensor, int, str | None]:
        """Forward and backward of the step's micro-batches: (the losses' sum, on the device; tokens; this rank's
        out-of-memory error when one ended them early, to go to the step-end agreement)."""
        from memfit.data import collate
        from memfit.guard import is_out_of_memory
        from memfit.train.losses import micro_step_loss, scored_tokens
        from memfit.train.objective import label_weights

        engine, device, samples = self.engine, self.engine.device, self.data.dataset.samples
        loss_sum, tokens = torch.zeros((), device=device), 0
        for number, chunk in enumerate(chunks):
            self.safe.before_micro_batch(number)
            try:
                if not self.layer_count:  # with decoder layers, oom@ fires inside the forward pass (faults.py)
                    faults.maybe_oom(self.step + 1, attempt, number + 1)
                faults.maybe_die(self.step + 1, self.output_dir)
                batch = collate(chunk, samples, self.data.pad_id)
                scored = scored_tokens(batch.labels, label_weights(objective, batch)).to(device)
                inputs = model_inputs(batch, device, self.position_packing, self.by_segment)
                self.in_micro_batch = (self.step + 1, attempt, number + 1)
                loss = engine.forward_backward(
                    lambda model: micro_step_loss(model, inputs, scored, head=self.head,
                                                  compute_dtype=self.precision.compute_dtype),
                    last=number == len(chunks) - 1)
                self.in_micro_batch = None
            except Exception as error:  # noqa: BLE001 - several processes: an OOM goes to the agreement
                self.in_micro_batch = None
                if not (engine.distributed or engine.collectives_in_step) or not is_out_of_memory(error):
                    raise
                failure = " ".join(str(error).split())[:200]
                if engine.collectives_in_step:  # the other ranks may wait in its collectives: no agreement follows
                    raise ShardedOom(failure) from None
                return loss_sum, tokens, failure  # to the step-end agreement, with the other ranks' next one
            loss_sum += loss.detach()
            tokens += batch.num_tokens
        return loss_sum, tokens, None
