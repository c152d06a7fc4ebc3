"""The training loop: set up, one optimizer step after another under the memory guard, finish.

One optimizer step takes `batch_size x grad_accum` rows from the data stream (epoch orders back to back), split
into micro-batches of `batch_size`. Safe points, where a stop (memory limit, SIGINT/SIGTERM) is honoured, are
before every micro-batch and at every step end; the memory guard's stop is honoured also inside a micro-batch, at
the entry of every decoder layer (a forward pre-hook that reads one attribute), so memory rising inside the forward
pass stops there even with `--grad-accum 1`. A step cut short is thrown away (its gradients dropped, the torch RNG
put back to where the step began) and the checkpoint holds the last finished step, so resuming redoes exactly that
step.

Out-of-memory recovery: a step that raises OOM is retried on the same rows with the micro-batch halved (so twice
as many micro-batches, the same effective batch and, by memfit.train.objective's weighting, the same gradient).
When micro-batch 1 fails too, the run checkpoints and exits 4.

How a step runs is its engine's business (memfit.distributed.engine: one process, DDP, FSDP, DeepSpeed), chosen
once at set-up. Several processes (torchrun / accelerate launch): one optimizer step takes
`batch_size x grad_accum x world_size` rows of the same global row order; every rank computes the step objective
over all of them (so token weights are normalised over the global step, without communication) and trains its
share (`ranks.shard_rows`). The safe points become agreements (memfit.distributed.collective): a stop, an OOM
recovery or an interrupt on any rank is taken by all of them at the same point. Rank 0 alone prints and writes the
run directory and the checkpoints. Engines whose forward and backward hold collectives (FSDP, DeepSpeed) do not
recover an out-of-memory error in the process: that rank exits 4 at once and the launcher ends the others.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from memfit.allocator import configure as configure_allocator
from memfit.config import TrainConfig
from memfit.runtime import default_device, signals_handled, stop_then_abort
from memfit.distributed.collective import Agreement
from memfit.distributed.collective import leave as leave_process_group
from memfit.distributed.engine import pick_engine
from memfit.distributed.ranks import current as current_ranks
from memfit.errors import (EXIT_GUARD_STOP, EXIT_INTERRUPTED, EXIT_OK, EXIT_OOM, EXIT_RELOAD, DiskFullError,
                           UserError)
from memfit.events import (CheckpointSaved, EvalEnd, Event, GuardNotice, MemoryReport, Notice, RunEnded,
                           RunStarted, StepEnd)
from memfit.train import checkpoint as ckpt
from memfit.train import setup
from memfit.train.job import TrainJob
from memfit.train.metrics import StepLog
from memfit.train.rundir import FINAL, RunDir, versions, write_final
from memfit.train.sizing import Sizing, resume_flags
from memfit.train.step import SafePoints, StepRunner, layer_stop_hook
from memfit.train.tblog import TensorBoardSink


# How a run ended is the loop's last event; `train()` returns it too.
TrainResult = RunEnded


@dataclass(frozen=True)
class Ending:
    """One way a run ends: its exit code, the reason its last checkpoint is written for, whether the printed
    command resumes it, and its message (formatted with the run's fields: see Trainer._finish)."""

    exit_code: int
    checkpoint: str
    resumable: bool
    message: str


ENDINGS = {
    "done": Ending(EXIT_OK, "end", False, "finished {step} steps"),
    "guard_stop": Ending(EXIT_GUARD_STOP, "memory limit", True,
                         "stopped by the memory guard at step {step}: {stop_reason}"),
    "oom": Ending(EXIT_OOM, "out of memory", True, "out of memory at step {next_step} with micro-batch {micro_batch}"),
    "interrupted": Ending(EXIT_INTERRUPTED, "interrupted", True, "interrupted ({signal}) at step {step}"),
    "reload": Ending(EXIT_RELOAD, "reload", False, "reloading at step {step} (--reload-interval {reload_after})"),
}


# Launchers forward the terminal's Ctrl-C to workers that already got it: a second signal this soon after the first
# is the same request, not an "abort now".
REPEATED_SIGNAL_S = 2.0


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class Trainer:
    # The guard's stop at decoder-layer entries (where the engine lets one rank leave a forward pass alone; not
    # under torch.compile). A class attribute so that benchmarks/guard_stop_overshoot.py can measure without it.
    stop_at_layers = True

    def __init__(self, job: TrainJob, config: TrainConfig, on_event: Callable[[Event], None] | None = None,
                 sizing: Sizing | None = None):
        self.job, self.config = job, config
        self.sizing = sizing  # the estimator's answers (memfit.train.sizing), handed down by the entry point
        self.ranks = current_ranks()
        self.distributed = self.ranks.distributed  # several processes: the safe points are agreements
        # Only rank 0 reports (the renderer, the run directory); the others train and keep quiet.
        self.sinks = [on_event] if on_event and self.ranks.is_main else []
        self.interrupted: str | None = None  # the signal that asked to stop (train() sets it)
        self.log: StepLog | None = None  # the steps' metrics (memfit.train.metrics), once the step count is known
        self.estimate: int | None = None
        self.last_checkpoint: Path | None = None  # written by this process
        self.steps: StepRunner | None = None  # one optimizer step after another (memfit.train.step), once built
        self._head_bypass = None

    def emit(self, event: Event) -> None:
        if not isinstance(event, StepEnd):
            self._flush_steps()  # anything else said about the run comes after the steps before it
        for sink in self.sinks:
            sink(event)

    # --- set-up ------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Check everything cheap first (output dir, resume conflicts, model files, every data line), then start
        the guard, then load the model, so bad input fails in seconds and loading is already watched."""
        from memfit.guard import cuda_alloc_conf_env
        from memfit.models import resolve_model
        from memfit.precision import resolve_precision

        job, config = self.job, self.config
        if config.quant == "none":
            from memfit.libraries import hide_bitsandbytes_from_peft, import_peft

            # No 4/8-bit layer in this process: PEFT need not import bitsandbytes. Imported now, since transformers
            # imports PEFT itself on the way to the LR schedule (transformers.trainer_utils).
            hide_bitsandbytes_from_peft()
            import_peft()
        self.device = job.device or default_device()
        self.engine = pick_engine(config, self.ranks, self.device)  # the one question of how a step runs
        if self.distributed:
            self._check_distributed()
        if self.device == "cuda":
            cuda_alloc_conf_env()  # before the first CUDA allocation, or the allocator ignores it
            if self.distributed:
                torch.cuda.set_device(self.ranks.local_rank)  # each rank its own GPU, before the guard reads one
        self.allocator = configure_allocator()
        setup.check_output_dir(job, config, self.ranks, self.engine.per_rank_checkpoint)
        self.precision = resolve_precision(config.dtype, self.device)
        self.resolved = resolve_model(job.model)
        if self.sizing and config.max_memory is not None and not self.distributed and not job.trial:
            # A probe's trial is checked by its parent; ranks of a launch each guard their own share.
            for warning in self.sizing.limit_warnings(self.resolved, config, self.device, job.force):
                self.emit(Notice(warning, "warning"))
        # A local dir is recorded absolute, so `--resume` and `-c config.yaml` work from any directory.
        self.model_spec = str(Path(job.model).resolve()) if Path(job.model).is_dir() else job.model
        model_dir = self.resolved.require_weights()
        self._load_data(model_dir)
        self._open_run_dir()
        self.limit, self.guard = setup.start_guard(config, self.device, self.ranks, self.allocator, self.emit)
        self._build(model_dir)
        self.step, self.samples_seen = 0, 0
        if job.resume is not None:
            self._restore(job.resume)
        if job.max_micro_batch and job.max_micro_batch < self.micro_batch:
            self.micro_batch = job.max_micro_batch  # same samples per step, split into more micro-batches
            self.emit(Notice(f"micro-batch {self.micro_batch} (x {math.ceil(self.effective_batch / self.micro_batch)}"
                             " accumulation): the previous process was killed or stopped at the limit", "warning"))
        self.start_step = self.step
        self._write_run_json(status="running")

    def _check_distributed(self) -> None:
        """What this runtime can run on several processes; each refusal is one line before anything starts."""
        if self.config.supervise or self.job.max_micro_batch or self.job.reload_after:
            raise UserError(f"--supervise runs one process; this is rank {self.ranks.rank} of {self.ranks.world_size}",
                            hint="drop --supervise (torchrun --max-restarts restarts failed workers)")
        self.engine.check()  # DeepSpeed on CPU, impossible combinations: one line

    def _load_data(self, model_dir: Path) -> None:
        config = self.config
        self.effective_batch = config.batch_size * config.grad_accum  # per rank
        self.global_batch = self.effective_batch * self.ranks.world_size  # rows per optimizer step, all ranks
        self.data = setup.load_data(self.job, config, model_dir, self.global_batch, self.emit)
        self.dataset, self.val_dataset = self.data.dataset, self.data.val_dataset
        self.total_steps = setup.total_steps(config, len(self.dataset.rows), self.global_batch)
        self.log = StepLog(self.total_steps, config.log_every, self.device == "cpu",
                           config.loss == "distrust" and config.distrust_mode == "add")

    def _open_run_dir(self) -> None:
        job = self.job
        self.run_dir = RunDir(job.output_dir, {} if job.attempt is None else {"attempt": job.attempt})
        if self.ranks.is_main:
            self.sinks.insert(0, self.run_dir)
            if self.config.tensorboard:  # before the model loads: a missing package fails in seconds
                self.sinks.append(TensorBoardSink(job.output_dir))
            for path in ckpt.remove_partial_checkpoints(job.output_dir):
                self.emit(Notice(f"removed {path.name}: a checkpoint write that did not finish", "warning"))

    def _build(self, model_dir: Path) -> None:
        from transformers import get_cosine_schedule_with_warmup

        from memfit.train.optim import build_optimizer

        config, engine = self.config, self.engine
        engine.start(self.precision)
        self.agreement = engine.agreement or Agreement(self.ranks)  # an engine without one: one process
        model = setup.load_model(self.job, config, self.precision, self.device, model_dir, self.emit)
        model.train()
        sharded = engine.shard(model)  # before the optimizer: sharding replaces the parameters (DTensors)
        if sharded:
            self.emit(Notice(sharded))
        optimizer = build_optimizer(config.optimizer, model.parameters(), config.lr)
        self.scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, self.total_steps)
        self._head_bypass, head, position_packing = setup.step_path(
            model, config, engine.chunked_loss_blocker(), self.dataset.stats.packed, self.emit)
        if config.compile:
            model = torch.compile(model, dynamic=True)  # rows vary in length: one graph for all of them
        engine.prepare(model, optimizer)
        self.safe = SafePoints(self.ranks, self.guard, self.agreement, config.memory_threshold,
                               lambda: self.interrupted, self.emit)
        self.steps = StepRunner(engine, self.data, config, self.precision, self.safe, self.scheduler, self.emit,
                                head, position_packing, self.job.trial, self.job.output_dir)
        # The guard's stop at each decoder layer's entry raises the step abort when the guard has asked to stop:
        # the step in flight is dropped at the next layer instead of running to its end (with one micro-batch per
        # step, the first safe point would be the step end). Only where the engine lets one rank leave a forward
        # pass alone: elsewhere the stop goes through the ranks' agreement at the safe points. Not under
        # torch.compile: dynamo would trace the attribute read as a constant.
        stops = self.stop_at_layers and engine.stops_inside_forward and not config.compile
        stop_hook = (lambda index, layers: layer_stop_hook(self.steps, self.guard, index, layers)) if stops else None
        self.steps.layer_count = setup.install_layer_hooks(engine.unwrapped(), lambda: self.steps.in_micro_batch,
                                                           stop_hook)

    @property
    def micro_batch(self) -> int:  # halved by an out-of-memory recovery, kept by a checkpoint
        return self.steps.micro_batch

    @micro_batch.setter
    def micro_batch(self, size: int) -> None:
        self.steps.micro_batch = size

    @property
    def recoveries(self) -> int:
        return self.steps.recoveries if self.steps else 0

    @property
    def position_packing(self) -> bool:  # packed samples kept apart by their position ids
        return self.steps.position_packing

    @position_packing.setter
    def position_packing(self, isolated: bool) -> None:
        self.steps.position_packing = isolated

    def restore_head(self) -> None:
        """The model computes logits again (after the run, for whoever holds it)."""
        bypass, self._head_bypass = self._head_bypass, None
        if bypass is not None:
            bypass.__exit__(None, None, None)

    def _restore(self, checkpoint: ckpt.Checkpoint) -> None:
        config = self.config
        for note in checkpoint.recovered:
            self.emit(Notice(f"checkpoint {note}", "warning"))
        for problem in checkpoint.skipped:
            self.emit(Notice(f"skipped {problem}; using the newest checkpoint that verifies", "warning"))
        load_states = self.engine.restore(checkpoint.path / ckpt.ENGINE_DIR)
        state = ckpt.restore(checkpoint, model=self.engine.unwrapped(), optimizer=self.engine.optimizer,
                             scheduler=self.scheduler, rank=self.ranks.rank, load_states=load_states)
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self.steps.recoveries = state.get("oom_recoveries", 0)
        self.log.recent_losses = state.get("recent_losses", [])
        if config.batch_size * config.grad_accum == state.get("effective_batch") \
                and checkpoint.meta["config"].get("batch_size") == config.batch_size:
            self.micro_batch = state.get("micro_batch", config.batch_size)  # keep an OOM-reduced micro-batch
        if self.ranks.is_main:
            self.run_dir.truncate_metrics_after(self.step)
        self.emit(Notice(f"resumed from {checkpoint.path} at step {self.step} of {self.total_steps}"))

    def _write_run_json(self, **status: Any) -> None:
        if self.ranks.is_main:  # the first write describes the run (memfit.train.rundir.RunDir.update_run_json)
            data = self.run_dir.update_run_json(status, self.guard.peak_watched_bytes, self.recoveries,
                                                self._run_description)
            self.estimate = data.get("estimate_bytes")

    def _run_description(self) -> dict[str, Any]:
        """What run.json says of the run from its start; config.yaml is written beside it (`memfit train -c`)."""
        from memfit.system import detect

        job, config = self.job, self.config
        self.run_dir.write_config({"model": self.model_spec, "data": str(Path(job.data).resolve()),
                                   "output_dir": str(Path(job.output_dir).resolve()), **config.model_dump()})
        return {
            "config": config.model_dump(), "model": job.model, "model_path": str(self.resolved.path),
            "data": str(job.data), "data_sha256": self.data.data_sha256,
            "val_data": str(job.val_data) if job.val_data else None,
            "data_stats": vars(self.dataset.stats), "device": self.device, "precision": self.precision.name,
            "versions": versions(), "hardware": detect().to_dict(),
            "limit": {"bytes": self.limit.limit_bytes, "auto": self.limit.auto,
                      "available_bytes": self.limit.available_bytes},
            # A probe trial estimates too, though its parent has the figure: the trial is to hold what a run holds.
            "estimate_bytes": self.sizing.estimate_bytes(self.resolved, config, self.device, self.limit.limit_bytes,
                                                         self.ranks.world_size, self.distributed)
            if self.sizing else None,
            "total_steps": self.total_steps, "started_at": now(), "world_size": self.ranks.world_size,
            "distributed": ("ddp" if config.distributed == "auto" else config.distributed)
            if self.distributed else None,
        }

    # --- checkpoints, evaluation, the end ----------------------------------------------------------------------

    def save(self, reason: str) -> Path:
        from memfit.guard import release_memory

        self._flush_steps()  # the checkpoint's losses and metrics.jsonl reach its step
        if self.last_checkpoint is not None and self.last_checkpoint.name == f"step-{self.step}":
            return self.last_checkpoint  # saved at this step already (a periodic save just before a stop)
        release_memory()  # the save must fit under the limit too
        started = time.perf_counter()
        # Several processes: rank 0 writes it (the adapter and optimizer are the same on every rank under DDP);
        # every rank's RNG goes in, gathered at this point, which every rank reaches together.
        rank_rng = self.agreement.gather(ckpt.rng_state()) if self.distributed else None
        scratch = self.job.output_dir / ckpt.CHECKPOINTS / f"{ckpt.TMP_PREFIX}{self.engine.name}-step-{self.step}"
        engine_files = self.engine.checkpoint_files(scratch)  # FSDP, DeepSpeed: collectives on every rank
        if not self.ranks.is_main:
            self.last_checkpoint = self.job.output_dir / ckpt.CHECKPOINTS / f"step-{self.step}"
            return self.last_checkpoint
        try:
            path = ckpt.save_checkpoint(self.job.output_dir, self.step, model=self.engine.unwrapped(),
                                        optimizer=self.engine.optimizer, scheduler=self.scheduler,
                                        trainer_state=self._trainer_state(), meta=self._checkpoint_meta(reason),
                                        keep=self.config.keep_checkpoints, rank_rng_states=rank_rng,
                                        **engine_files)
        except DiskFullError:
            self._ended_on_disk_full()
            raise
        self.last_checkpoint = path
        self.emit(CheckpointSaved(self.step, path, reason, time.perf_counter() - started))
        return path

    def _trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "samples_seen": self.samples_seen, "micro_batch": self.micro_batch,
                "grad_accum": math.ceil(self.effective_batch / self.micro_batch),
                "effective_batch": self.effective_batch, "oom_recoveries": self.recoveries,
                "recent_losses": self.log.recent_losses[-50:], "total_steps": self.total_steps,
                "world_size": self.ranks.world_size, "global_batch": self.global_batch}

    def _checkpoint_meta(self, reason: str) -> dict[str, Any]:
        job = self.job
        return {"reason": reason, "config": self.config.model_dump(), "model": self.model_spec,
                "model_path": str(self.resolved.path), "data": str(Path(job.data).resolve()),
                "data_sha256": self.data.data_sha256,
                "val_data": str(Path(job.val_data).resolve()) if job.val_data else None,
                "output_dir": str(Path(job.output_dir).resolve()), "versions": versions(),
                "world_size": self.ranks.world_size}

    def _ended_on_disk_full(self) -> None:
        self.guard.stop()
        self._write_run_json(status="disk_full", exit_code=DiskFullError.exit_code, step=self.step,
                             finished_at=now(),
                             checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None)

    def save_final(self) -> Path:
        gathered = self.engine.final_state()  # every rank takes part (FSDP, DeepSpeed: a collective)
        if not self.ranks.is_main:
            return self.job.output_dir / FINAL  # rank 0 writes it

        def write(directory: Path) -> None:
            extra = {} if gathered is None else {"state_dict": gathered}
            self.engine.unwrapped().save_pretrained(str(directory), safe_serialization=True, **extra)
            self.data.tokenizer.save_pretrained(str(directory))

        try:
            return write_final(self.job.output_dir, write)
        except Exception as error:
            full = ckpt.disk_full_reason(error, self.job.output_dir)
            if not full:
                raise
            self._ended_on_disk_full()
            raise DiskFullError(f"could not write {self.job.output_dir / FINAL}: {full}",
                                hint=f"free space on that disk, then `memfit train --resume {self.last_checkpoint}` "
                                     "writes it (the training is done and checkpointed)") from None

    def evaluate(self) -> None:
        """The validation loss (memfit.train.validation), each rank its share of the rows, summed over them."""
        from memfit.train.validation import validation_loss

        rows, batches = self.engine.eval_share(self.val_dataset.rows, self.micro_batch)
        model = self.engine.model
        model.eval()
        result = validation_loss(model, self.val_dataset, rows, self.micro_batch, self.data.pad_id,
                                 self.engine.device, head=self.steps.head, compute_dtype=self.precision.compute_dtype,
                                 position_packing=self.position_packing, by_segment=self.steps.by_segment,
                                 batches=batches)
        model.train()
        loss_sum, count = result.loss_sum, result.tokens
        if self.distributed:
            totals = torch.tensor([loss_sum, float(count)], dtype=torch.float64, device=self.engine.device)
            self.engine.sum_over_ranks([totals])
            loss_sum, count = float(totals[0]), int(totals[1])
        val_loss = loss_sum / max(count, 1)
        self.emit(EvalEnd(self.step, val_loss, math.exp(min(val_loss, 50.0)), count))

    def memory_report_text(self, sample) -> str:
        from memfit.guard import memory_report

        return memory_report(sample, self.limit, self.config.memory_threshold, self.guard.peak_watched_bytes,
                             self.guard.host)

    # --- the loop ----------------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        unwrapped = self.engine.unwrapped()
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in unwrapped.parameters() if p.requires_grad)
        total = sum(getattr(p, "ds_numel", p.numel()) for p in unwrapped.parameters())
        self.emit(RunStarted(self.job.output_dir, self.step, self.total_steps, self.resolved.name, self.device,
                             self.precision.name, trainable, total, self.limit.limit_bytes, self.estimate))
        self.last_checkpoint = None
        sample, events = self.guard.end_step(self.step)  # the model alone may already be over the limit
        self._emit_guard(events)
        status = "done"
        while self.step < self.total_steps and not self.safe.stop_agreed():
            rows_index = self._rows_for_step()
            started = time.perf_counter()
            outcome = self.steps.run(self.step, rows_index, self.last_checkpoint)
            if outcome in ("oom", "aborted"):
                status = "oom" if outcome == "oom" else status
                break
            self.step += 1
            self.samples_seen += self.global_batch
            self.allocator.step_end()  # part of the step's time: it is what RSS following live tensors costs
            elapsed = time.perf_counter() - started
            self.guard.note_step_time(elapsed)
            sample, events = self.guard.end_step(self.step)
            self._step_done(outcome, elapsed, sample)
            self._emit_guard(events)
            if self._between_steps(sample):
                status = "reload"
                break
        interrupted, guard_stop = self.safe.how_it_stopped()
        if status not in ("oom", "reload") and interrupted:
            status = "interrupted"
        elif status not in ("oom", "reload") and guard_stop:
            status = "guard_stop"
        return self._finish(status)

    def _between_steps(self, sample) -> bool:
        """Evaluation, memory report and periodic checkpoint when due; True when the run reloads now."""
        config, step, last = self.config, self.step, self.step >= self.total_steps
        if self.val_dataset and config.eval_every and step % config.eval_every == 0:
            self.evaluate()
        if step % config.memory_report_interval == 0 and not last:
            self.emit(MemoryReport(step, self.memory_report_text(sample)))
        if step % config.save_every == 0 and not last and not self.job.trial:
            self.save("periodic")
        reload_after = self.job.reload_after
        return bool(reload_after) and step - self.start_step >= reload_after and not last \
            and not self.safe.should_stop()

    def _rows_for_step(self) -> list[int]:
        return self.data.rows_for_step(self.samples_seen, self.global_batch,
                                       self.job.trial and self.step == self.total_steps - 1)

    def _row_length(self, row: int) -> int:
        return self.data.row_length(row)

    def _step_done(self, stats: dict[str, Any], elapsed: float, sample) -> None:
        """Hold the step until its loss is read back (memfit.train.metrics)."""
        if self.log.hold(stats, self.step, elapsed, sample, self.scheduler.get_last_lr()[0], self.micro_batch):
            self._flush_steps()

    def _flush_steps(self) -> None:
        for event in self.log.flush() if self.log else ():
            self.emit(event)

    def _emit_guard(self, events) -> None:
        for event in events:
            self.emit(GuardNotice(event.kind, event.step, event.watched_bytes, event.message, event.limit))

    def _finish(self, status: str) -> TrainResult:
        from memfit.guard import read_memory

        ending = ENDINGS[status]
        self._flush_steps()
        final_dir = self._last_writes(status)
        self.guard.stop()
        memory = read_memory(self.device)
        resume = (f"memfit train --resume {self.last_checkpoint}{self._resume_flags(status)}"
                  if ending.resumable and not self.job.trial else None)
        per_rank, stop_reason, signal_name = self.safe.at_end(memory.peak_rss_bytes, self.limit.limit_bytes)
        message = ending.message.format(step=self.step, next_step=self.step + 1, micro_batch=self.micro_batch,
                                        stop_reason=stop_reason, signal=signal_name,
                                        reload_after=self.job.reload_after)
        extra = {"ranks": per_rank, "estimate_per_rank_bytes": self.estimate} if per_rank else {}
        extra["guard_thread_cpu_s"] = round(self.guard.sampler.thread_cpu_s, 4)
        if status == "guard_stop":  # which limit stopped it: device (--max-memory), host or host_available (a GPU's)
            stop_rank = self.safe.decision.stop_rank if per_rank else None
            extra.update(stop_reason=stop_reason, stop_limit=per_rank[stop_rank]["stop_limit"]
                         if stop_rank is not None else self.guard.stop_limit)
        if self.guard.host is not None:
            extra.update(peak_host_rss_bytes=self.guard.peak_host_rss_bytes,
                         min_system_available_bytes=self.guard.min_system_available_bytes,
                         host_limit={"bytes": self.guard.host.rss.limit_bytes, "auto": self.guard.host.rss.auto,
                                     "floor_bytes": self.guard.host.floor_bytes})
        self._write_run_json(status=status, exit_code=ending.exit_code, step=self.step, finished_at=now(),
                             checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
                             final_dir=str(final_dir) if final_dir else None,
                             # The OS's high-water mark (VmHWM): the true peak, between the guard's readings too.
                             peak_rss_bytes=memory.peak_rss_bytes, **extra)
        ended = RunEnded(status, ending.exit_code, self.step, self.total_steps, message, self.last_checkpoint,
                         final_dir, resume, self.memory_report_text(memory), self.recoveries,
                         extra.get("stop_limit"))
        self.emit(ended)  # rank 0's entry point writes the run report as this reaches it (memfit.report.report_at_end)
        # No rank returns (and exits) before rank 0's files are written: the launcher stops the other workers as
        # soon as one exits with a non-zero code.
        self.agreement.barrier()
        return ended

    def _last_writes(self, status: str) -> Path | None:
        """The run's last checkpoint, and final/ when it is done (after a last evaluation); a trial keeps nothing."""
        if self.job.trial:
            return None
        if status != "done":
            self.save(ENDINGS[status].checkpoint)
            return None
        if self.val_dataset and not (self.config.eval_every and self.step % self.config.eval_every == 0):
            self.evaluate()
        self.save(ENDINGS[status].checkpoint)
        return self.save_final()

    def _resume_flags(self, status: str) -> str:
        """After a guard stop: what makes the resume fit (from the estimate and the peak seen), else nothing."""
        if status != "guard_stop" or self.distributed or self.sizing is None \
                or self.guard.stop_limit not in (None, "device"):
            return ""  # a host RAM stop on a GPU: a smaller micro-batch is no answer the estimate can give
        largest = self.sizing.largest_micro_batch(self.resolved, self.config, self.device)
        return resume_flags(self.limit, self.guard.peak_watched_bytes, self.estimate, self.micro_batch,
                            self.effective_batch, largest)


def train(job: TrainJob, config: TrainConfig, on_event: Callable[[Event], None] | None = None,
          sizing: Sizing | None = None) -> TrainResult:
    """Train as `config` says; returns how it ended (exit code included). SIGINT/SIGTERM stop it at the next safe
    point with a checkpoint; a second signal aborts at once (KeyboardInterrupt, after one line saying so: the step
    in flight and any checkpoint being written are dropped, the last complete checkpoint stays resumable).
    `sizing`: the estimator's answers (memfit.sizing.EstimatorSizing) for run.json's estimate, the --max-memory
    check and the resume flags after a guard stop; without it the run trains unchecked by the estimator."""
    import os

    trainer = Trainer(job, config, on_event, sizing)
    # A supervised trainer (memfit.train.supervisor) asked for SIGTERM when its supervisor dies (PR_SET_PDEATHSIG).
    # The kernel sends it again at each reparenting (to another thread of the dying supervisor, then to init): once
    # the supervisor is gone, a repeated SIGTERM is that, not a user's second signal, and must not abort the stop.
    supervisor = os.getppid() if job.attempt is not None else None

    def repeat_of_the_first(seconds_since: float) -> bool:
        if trainer.distributed and seconds_since < REPEATED_SIGNAL_S:
            return True  # the launcher passing on the Ctrl-C this worker already got from the terminal
        return supervisor is not None and os.getppid() != supervisor  # the parent-death signal again (see above)

    with signals_handled(stop_then_abort(trainer, repeat_of_the_first)):
        try:
            trainer.setup()
            result = trainer.run()
        except KeyboardInterrupt:
            if trainer.interrupted:
                _say_aborted(trainer)
            raise
        finally:
            trainer.restore_head()
            guard = getattr(trainer, "guard", None)
            if guard is not None:
                guard.stop()
    if trainer.distributed:
        leave_process_group()
    return result


def _say_aborted(trainer: Trainer) -> None:
    """The second signal's abort, in one line and in run.json: nothing else is written on the way out."""
    try:
        trainer.emit(Notice(f"aborted by a second {trainer.interrupted}: the step in flight and any checkpoint "
                            "being written are dropped; resume from the newest complete checkpoint with "
                            f"`memfit train --resume {trainer.job.output_dir}`", "warning"))
        if hasattr(trainer, "start_step"):  # run.json written (set-up finished): say how it ended there too
            trainer._write_run_json(status="aborted", exit_code=EXIT_INTERRUPTED, step=trainer.step,
                                    finished_at=now())
    except Exception:  # noqa: BLE001 - saying so must not hide the abort itself
        pass
