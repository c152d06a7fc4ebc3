"""The MLX engine's training loop: `train_mlx(job, config)`, the MLX counterpart of memfit.train.train.

The same contract as the torch loop: the same TrainJob and TrainConfig, the same events (the renderer, the run
directory's metrics.jsonl/events.jsonl and run.json, the report), the same data stream (memfit's tokenisation,
masking, packing and seeded row order) and step objective (memfit.train.objective: CE or distrust token weights
fixed over the whole step, so accumulation and a smaller micro-batch give the same gradient), the same guard policy
on MLX's counters (memfit.mlx.memory), the same checkpoint format and exit codes (3 guard stop, 4 OOM, 75 reload,
130 interrupted).

One optimizer step: the step's rows split into micro-batches; each micro-batch's loss sum_t w_t * CE_t and its
gradient by `nn.value_and_grad` (compiled with `mx.compile` as mlx-lm's trainer does, model/optimizer/RNG state as
its inputs and outputs), gradients summed over the micro-batches, the last one's in the same graph as the clipping
(`mlx.optimizers.clip_grad_norm`) and the optimizer's update (as mlx-lm's step), whose learning rate follows memfit's
schedule (linear warmup, then cosine decay to 0 over the remaining steps: transformers'
get_cosine_schedule_with_warmup, built from mlx.optimizers' schedules).
Safe points (stop, interrupt) are before every micro-batch and at every step end; a dropped step puts MLX's RNG
back, so the checkpoint of the step before resumes exactly.
"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from memfit import faults
from memfit.allocator import DEFAULT_POLICY as DEFAULT_ALLOCATOR_POLICY
from memfit.allocator import configure as configure_allocator
from memfit.config import TrainConfig
from memfit.errors import (EXIT_GUARD_STOP, EXIT_INTERRUPTED, EXIT_OK, EXIT_OOM, EXIT_RELOAD, DiskFullError,
                           UserError)
from memfit.mlx import checkpoint as mlx_ckpt
from memfit.mlx import memory as mlx_memory
from memfit.mlx.batches import MicroBatch, micro_batch
from memfit.mlx.loss import make_loss
from memfit.runtime import signals_handled, stop_then_abort
from memfit.train import checkpoint as ckpt
from memfit.events import (CheckpointSaved, EvalEnd, Event, GuardNotice, MemoryReport, Notice, OomRecovered,
                                 RunEnded, RunStarted, StepEnd)


class _StepAborted(Exception):
    pass


def check_supported(config: TrainConfig, job) -> None:
    """What the MLX engine cannot do, refused in one line before anything loads."""
    from memfit.distributed.ranks import current

    problems = []
    if current().distributed:
        problems.append("several processes (torchrun/accelerate launch): the MLX engine trains in one process")
    if config.distributed != "auto":
        problems.append(f"--distributed {config.distributed} (DeepSpeed/FSDP are torch engines)")
    if config.offload != "none":
        problems.append("--offload cpu (unified memory has no separate device to offload from)")
    if config.optimizer == "adamw8bit":
        problems.append("--optimizer adamw8bit (bitsandbytes is CUDA/torch only; use adamw, adafactor or sgd)")
    if config.qlora_upcast:
        problems.append("--qlora-upcast (a bitsandbytes/PEFT layout; MLX keeps the unquantized weights as loaded)")
    if config.compile:
        problems.append("--compile (torch.compile; the MLX engine always compiles its step with mx.compile)")
    if job.device not in (None, "mlx", "cpu", "mps", "gpu"):
        problems.append(f"--device {job.device} (MLX runs on the Apple GPU, or the CPU)")
    if problems:
        raise UserError(f"--engine mlx cannot run {problems[0]}",
                        hint="drop that option, or use --engine torch")


def cosine_with_warmup(lr: float, warmup_steps: int, total_steps: int) -> Callable[[mx.array], mx.array]:
    """transformers' get_cosine_schedule_with_warmup as an mlx.optimizers schedule: step s (the optimizer's count
    before its update) gets lr * s / warmup during warmup, then lr * (1 + cos(pi * (s - warmup) / (total - warmup)))
    / 2 (the torch engine's LambdaLR reaches the same values at the same steps)."""
    decay = optim.cosine_decay(lr, max(1, total_steps - warmup_steps), 0.0)
    if warmup_steps <= 0:
        return decay
    warmup = optim.linear_schedule(0.0, lr, warmup_steps)
    return optim.join_schedules([warmup, decay], [warmup_steps])


def build_optimizer(config: TrainConfig, schedule):
    """mlx.optimizers by memfit's name, with the torch engine's settings (no weight decay; AdamW with bias
    correction, as torch's)."""
    if config.optimizer == "adamw":
        return optim.AdamW(learning_rate=schedule, weight_decay=0.0, bias_correction=True)
    if config.optimizer == "adafactor":
        return optim.Adafactor(learning_rate=schedule, scale_parameter=False, relative_step=False)
    if config.optimizer == "sgd":
        return optim.SGD(learning_rate=schedule)
    raise UserError(f"--optimizer {config.optimizer} is not available on the MLX engine",
                    hint="choose adamw, adafactor or sgd")


class MlxTrainer:
    def __init__(self, job, config: TrainConfig, on_event: Callable[[Event], None] | None = None, *,
                 use_dora: bool = False, group_size: int = 64, export_peft: bool = True, compile_step: bool = True):
        self.job, self.config = job, config
        self.use_dora, self.group_size, self.export_peft, self.compile_step = use_dora, group_size, export_peft, \
            compile_step
        self.sinks = [on_event] if on_event else []
        self.interrupted: str | None = None
        self.recoveries = 0
        self.recent_losses: list[float] = []
        self.step_times: list[float] = []
        self.last_checkpoint: Path | None = None
        self.step = 0
        self.samples_seen = 0
        self.update_pending = False  # an update is built, not yet evaluated: a failure now leaves it part-done

    def emit(self, event: Event) -> None:
        for sink in self.sinks:
            sink(event)

    # --- set-up ------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        from memfit.models import resolve_model
        from memfit.train.rundir import RunDir, check_fresh_output_dir

        job, config = self.job, self.config
        check_supported(config, job)
        if job.resume is None and job.fresh_restart:
            RunDir(job.output_dir).truncate_metrics_after(0)
        elif job.resume is None:
            check_fresh_output_dir(job.output_dir)
        else:
            from memfit.train.checkpoint import resume_conflicts

            conflicts = resume_conflicts(job.resume.meta.get("config", {}), config)
            if conflicts and not job.force:
                raise UserError(f"resuming {job.resume.path} with a changed config breaks exactness: "
                                f"{'; '.join(conflicts)}", hint="keep the checkpoint's settings, or add --force")
        self.resolved = resolve_model(job.model)
        self.model_spec = str(Path(job.model).resolve()) if Path(job.model).is_dir() else job.model
        model_dir = self.resolved.require_weights()
        self.model_dir = model_dir
        self._load_data(model_dir)
        self.run_dir = RunDir(job.output_dir, {} if job.attempt is None else {"attempt": job.attempt})
        self.sinks.insert(0, self.run_dir)
        for path in ckpt.remove_partial_checkpoints(job.output_dir):
            self.emit(Notice(f"removed {path.name}: a checkpoint write that did not finish", "warning"))
        self._start_guard()
        self._build(model_dir)
        if job.resume is not None:
            self._restore(job.resume)
        if job.max_micro_batch and job.max_micro_batch < self.micro_batch:
            self.micro_batch = job.max_micro_batch
            self.emit(Notice(f"micro-batch {self.micro_batch}: the previous process was killed or stopped at the "
                             "limit", "warning"))
        self.start_step = self.step
        self._write_run_json(status="running")

    def _load_data(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        from memfit.data import RowOrder, build_dataset, pad_token_id

        job, config = self.job, self.config
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.pad_id = pad_token_id(self.tokenizer)
        distrust = config.loss == "distrust"
        # Packing only when asked for: mlx-lm's models take no position ids, so packed samples would attend to each
        # other (the torch engine keeps them apart); unpacked rows grouped by length pad little.
        packing = bool(config.packing)
        self.dataset = build_dataset(job.data, self.tokenizer, config.seq_len, packing, distrust)
        self.val_dataset = (build_dataset(job.val_data, self.tokenizer, config.seq_len, packing, distrust)
                            if job.val_data else None)
        self.data_sha256 = ckpt.sha256_file(Path(job.data))
        if job.resume is not None and job.resume.meta.get("data_sha256") not in (None, self.data_sha256) \
                and not job.force:
            raise UserError(f"{job.data} changed since checkpoint {job.resume.path} was written",
                            hint="resume with the same data file, or add --force")
        self.emit(Notice(f"data: {self.dataset.stats.summary()}"))
        if self.dataset.stats.packed:
            self.emit(Notice("MLX engine: packed samples can attend to each other (mlx-lm models take no position "
                             "ids); drop --packing to keep them apart", "warning"))
        self.effective_batch = config.batch_size * config.grad_accum
        self.micro_batch = config.batch_size
        grouped = config.group_by_length and not self.dataset.stats.packed
        self.row_order = RowOrder([len(row.input_ids) for row in self.dataset.rows], config.seed,
                                  self.effective_batch, grouped)
        rows = len(self.dataset.rows)
        self.total_steps = config.max_steps or max(1, math.ceil(config.epochs * rows / self.effective_batch))

    def _estimate(self):
        """memfit's MLX estimate of this run (its step's need bounds MLX's run-ahead: memfit.mlx.memory); None
        where the estimator cannot say (a mixture of experts, an architecture it cannot read): MLX then runs ahead
        up to the guard's threshold, as before."""
        from memfit.estimate.memory import Hardware
        from memfit.estimate.mlx_memory import estimate_mlx

        try:
            hardware = Hardware("mps" if mlx_memory.metal() else "cpu", self.limit.limit_bytes)
            return estimate_mlx(self.resolved.config, self.config, hardware, self.resolved.name)
        except Exception:  # noqa: BLE001 - training does not depend on it
            return None

    def _start_guard(self) -> None:
        from memfit.guard import Guard, choose_limit

        self.limit = choose_limit(self.config.max_memory, "cpu", 0.8)
        self.emit(Notice(self.limit.describe()))
        # MLX's CPU build takes its buffers from malloc: under glibc's dynamic mmap threshold the freed activations
        # stay in the heap and the RSS the guard watches climbs step by step (tiny model, 95 x 256: 1.38 -> 1.64 GB
        # between steps with MLX's arrays unchanged); the torch engine's policy keeps RSS on what is live. On Metal
        # the buffers are not malloc's and the policy changes nothing.
        self.allocator = configure_allocator()
        if self.allocator.policy != DEFAULT_ALLOCATOR_POLICY:
            self.emit(Notice(self.allocator.describe()))
        self.estimate = self._estimate()
        need = self.estimate.mlx_peak_bytes if self.estimate is not None else None
        self.mlx_limits = mlx_memory.apply_limits(self.limit.limit_bytes, self.config.memory_threshold, need)
        self.emit(Notice(self.mlx_limits.describe()))
        width = mlx_memory.set_eval_width()
        if width != str(mlx_memory.EVAL_WIDTH):  # the user's order: the estimate was fitted in MLX's default
            self.emit(Notice(f"MLX evaluates the step {'depth first' if width == '1' else 'breadth first'} "
                             f"({mlx_memory.EVAL_WIDTH_VARIABLE}={width}, set in the environment; memfit's estimate "
                             f"is fitted at {mlx_memory.EVAL_WIDTH})"))
        self.guard = Guard(self.limit, threshold=self.config.memory_threshold,
                           interval_s=self.config.memory_sample_interval, reader=mlx_memory.read_mlx_memory)
        self.guard.start()

    def _build(self, model_dir: Path) -> None:
        from memfit.mlx.model import load_for_training

        config = self.config
        mx.random.seed(config.seed)  # the adapters' initial values (and dropout) draw from it
        np.random.seed(config.seed)
        self.device = mlx_memory.device_name()
        self.loaded = load_for_training(model_dir, config, group_size=self.group_size, use_dora=self.use_dora,
                                        on_metal=mlx_memory.metal())
        for note in self.loaded.notes:
            self.emit(Notice(note))
        self.model = self.loaded.model
        self.model.train()
        self.schedule = cosine_with_warmup(config.lr, config.warmup_steps, self.total_steps)
        self.optimizer = build_optimizer(config, self.schedule)
        self._compile()

    def _compile(self) -> None:
        model, optimizer, max_norm = self.model, self.optimizer, self.config.max_grad_norm
        self._loss = make_loss(model, self.config.chunked_loss)
        loss_and_grad = nn.value_and_grad(model, self._loss)

        def accumulate(inputs, targets, weights, grads):
            loss, micro_grads = loss_and_grad(model, inputs, targets, weights)
            if grads is not None:
                micro_grads = tree_map(lambda a, b: a + b, grads, micro_grads)
            return loss, micro_grads

        def update(inputs, targets, weights, grads):
            # Without clipping: the last micro-batch's gradient and the optimizer update in one graph, as mlx-lm's
            # step. MLX frees each gradient (and reuses its buffer) as the update consumes it, instead of holding the
            # whole gradient tree.
            loss, grads = accumulate(inputs, targets, weights, grads)
            optimizer.update(model, grads)
            return loss

        def clip_and_update(grads):
            # With clipping, the update is a graph of its own, on gradients already evaluated. Every gradient waits
            # for the norm, so inside the fused graph MLX kept the backward pass's arrays too: 24 layers, 2 x 1024,
            # checkpointing, peak 564 MB fused against 107 MB gradients first (benchmarks/mlx_step_phases.py). So the
            # clipped step holds what the unclipped one does; the fused order held less in one real case (smollm2-135m,
            # 4 x 256, chunked loss: 931 MB against 1,174, the unclipped step's; docs/mlx.md).
            grads, norm = optim.clip_grad_norm(grads, max_norm)
            optimizer.update(model, grads)
            return norm

        self._state = [model.state, optimizer.state, mx.random.state]
        if self.compile_step:
            accumulate, update, clip_and_update = (
                partial(mx.compile, inputs=self._state, outputs=self._state)(function)
                for function in (accumulate, update, clip_and_update))
        self._accumulate, self._update, self._clip_and_update = accumulate, update, clip_and_update

    def _restore(self, checkpoint: ckpt.Checkpoint) -> None:
        for note in checkpoint.recovered:
            self.emit(Notice(f"checkpoint {note}", "warning"))
        for problem in checkpoint.skipped:
            self.emit(Notice(f"skipped {problem}; using the newest checkpoint that verifies", "warning"))
        state = mlx_ckpt.restore(checkpoint, model=self.model, optimizer=self.optimizer)
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self.recoveries = state.get("oom_recoveries", 0)
        self.recent_losses = state.get("recent_losses", [])
        if self.config.batch_size * self.config.grad_accum == state.get("effective_batch") \
                and checkpoint.meta["config"].get("batch_size") == self.config.batch_size:
            self.micro_batch = state.get("micro_batch", self.config.batch_size)
        self.run_dir.truncate_metrics_after(self.step)
        self.emit(Notice(f"resumed from {checkpoint.path} at step {self.step} of {self.total_steps}"))

    def _write_run_json(self, **status: Any) -> None:
        from memfit.train.rundir import versions

        data = self.run_dir.read_run_json()
        if "config" not in data:
            trainable, total = self.loaded.counts()
            data.update({
                "config": self.config.model_dump(), "engine": "mlx", "model": self.job.model,
                "model_path": str(self.resolved.path), "data": str(self.job.data), "data_sha256": self.data_sha256,
                "val_data": str(self.job.val_data) if self.job.val_data else None,
                "data_stats": vars(self.dataset.stats), "device": self.device, "precision": self.loaded.dtype,
                "versions": {**versions(), **_mlx_versions()},
                "limit": {"bytes": self.limit.limit_bytes, "auto": self.limit.auto,
                          "available_bytes": self.limit.available_bytes},
                "mlx_limits": vars(self.mlx_limits), "total_steps": self.total_steps,
                "estimate_bytes": self.estimate.total_bytes if self.estimate is not None else None,
                "trainable_params": trainable, "total_params": total,
                "adapter": self.loaded.adapter_config, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "world_size": 1, "distributed": None,
            })
            self.run_dir.write_config({"model": self.model_spec, "data": str(Path(self.job.data).resolve()),
                                       "output_dir": str(Path(self.job.output_dir).resolve()), "engine": "mlx",
                                       **self.config.model_dump()})
        if "peak_rss_bytes" in status:
            status["peak_rss_bytes"] = max(data.get("peak_rss_bytes") or 0, status["peak_rss_bytes"])
        data.update(status)
        data["peak_watched_bytes"] = max(data.get("peak_watched_bytes") or 0, self.guard.peak_watched_bytes)
        data["peak_mlx_bytes"] = max(data.get("peak_mlx_bytes") or 0, int(mx.get_peak_memory()))
        data["oom_recoveries"] = self.recoveries
        self.run_dir.write_run_json(data)

    # --- one optimizer step ------------------------------------------------------------------------------------

    def _should_stop(self) -> bool:
        return self.guard.stop_requested or self.interrupted is not None

    def _train_step(self, rows_index: list[int], attempt: int) -> dict[str, Any]:
        from memfit.train.objective import step_objective

        rows = sorted((self.dataset.rows[i] for i in rows_index), key=lambda row: -len(row.input_ids))
        objective = step_objective(rows, self.dataset.samples, self.config)
        chunks = [rows[i:i + self.micro_batch] for i in range(0, len(rows), self.micro_batch)]

        def micro_batches():
            for number, chunk in enumerate(chunks):
                if self._should_stop():
                    raise _StepAborted
                faults.maybe_oom(self.step + 1, attempt, number + 1, "forward")
                faults.maybe_die(self.step + 1, self.job.output_dir)
                yield micro_batch(chunk, self.dataset.samples, self.pad_id, objective, self.config.seq_len - 1)

        loss_sum, norm, tokens = self.optimizer_step(
            micro_batches(), len(chunks),
            built=lambda number, phase: faults.maybe_oom(self.step + 1, attempt, number, phase))
        faults.maybe_leak()
        return {"loss": float(loss_sum), "grad_norm": float(norm) if self.config.max_grad_norm else None,
                "tokens": tokens, "micro_batches": len(chunks), "distrust_term": objective.distrust_term}

    def optimizer_step(self, micro_batches: Iterable[MicroBatch], count: int,
                       built: Callable[[int, str], None] | None = None) -> tuple[mx.array, mx.array, int]:
        """One optimizer step over `count` micro-batches: (the summed loss, the gradient norm, the tokens). Every
        micro-batch's gradient is added to the running sum, one micro-batch's graph evaluated at a time (its
        activations are freed before the next). Without clipping the last one's gradient goes straight into the
        update; with clipping the gradients are evaluated first, then clipped and applied.
        `built(number, phase)` runs once a graph is built, before it is evaluated: phase `backward` for micro-batch
        `number`'s, `update` for the optimizer update's (fault injection)."""
        clip = bool(self.config.max_grad_norm)
        grads, loss_sum, tokens, norm = None, mx.array(0.0), 0, mx.array(0.0)

        def evaluate(number: int, phases: tuple[str, ...], *outputs: Any) -> None:
            if built is not None:
                for phase in phases:
                    built(number, phase)
            # The gradients or the updated state first, the loss last (as mlx-lm): MLX evaluates in this order, and
            # with the loss first the forward pass is evaluated alone, its arrays all held for the backward pass.
            # Whole smollm2-135m, LoRA r16, 1 x 128, checkpointing: MLX's peak 670 MB this way, 719 MB loss first.
            mx.eval(*outputs)

        for number, arrays in enumerate(micro_batches, start=1):
            tokens += arrays.tokens
            if number < count or clip:
                loss, grads = self._accumulate(arrays.inputs, arrays.targets, arrays.weights, grads)
                loss_sum = loss_sum + loss
                evaluate(number, ("backward",), grads, loss_sum)
            else:
                loss = self._update(arrays.inputs, arrays.targets, arrays.weights, grads)
                self.update_pending = True  # the model and optimizer now hold this update's (lazy) arrays
                grads, loss_sum = None, loss_sum + loss
                evaluate(number, ("backward", "update"), self._state, loss_sum)
        if clip:
            norm = self._clip_and_update(grads)
            self.update_pending = True
            grads = None
            evaluate(count, ("update",), self._state, norm)
        self.update_pending = False
        return loss_sum, norm, tokens

    def _run_step_with_recovery(self, rows_index: list[int]) -> dict[str, Any] | str:
        from memfit.guard import is_out_of_memory

        attempt = 0
        key = mlx_ckpt.rng_key()  # dropout's RNG as the step began: a dropped or retried step starts from it again
        while True:
            try:
                return self._train_step(rows_index, attempt)
            except _StepAborted:
                failure = "aborted"
            except Exception as error:  # noqa: BLE001 - only out-of-memory errors are handled, the rest re-raised
                if not (is_out_of_memory(error) or "[malloc" in str(error).lower()):
                    raise
                failure = " ".join(str(error).split())[:200]
            mlx_memory.clear_cache()
            mlx_ckpt.set_rng_key(key)
            if failure == "aborted":
                return "aborted"
            if self.update_pending:
                # The update's graph failed part-way: the model and optimizer hold its arrays, some never computed,
                # and MLX reuses the old ones' buffers as the update consumes them (no copy is kept: that is what
                # keeps the step's peak at mlx-lm's). Neither retried nor saved; the newest checkpoint resumes it.
                self.emit(Notice(f"out of memory in the optimizer update of step {self.step + 1} ({failure}): the "
                                 "trained arrays were part-way through it, so nothing is saved from them", "warning"))
                return "oom_in_update"
            if self.micro_batch == 1 or self.job.trial:
                self.emit(Notice(f"out of memory at step {self.step + 1} with micro-batch {self.micro_batch}: "
                                 f"{failure}", "warning"))
                return "oom"
            self.micro_batch = max(1, self.micro_batch // 2)
            self.recoveries += 1
            attempt += 1
            accum = math.ceil(self.effective_batch / self.micro_batch)
            self.emit(OomRecovered(self.step + 1, self.micro_batch, accum, self.recoveries,
                                   f"out of memory at step {self.step + 1}: retrying the same {self.effective_batch} "
                                   f"samples as {accum} micro-batches of {self.micro_batch} ({failure})"))

    # --- checkpoints, evaluation, the end ----------------------------------------------------------------------

    def save(self, reason: str) -> Path:
        from memfit.train.rundir import versions

        if self.last_checkpoint is not None and self.last_checkpoint.name == f"step-{self.step}":
            return self.last_checkpoint
        mlx_memory.clear_cache()  # the save must fit under the limit too
        started = time.perf_counter()
        state = {"step": self.step, "samples_seen": self.samples_seen, "micro_batch": self.micro_batch,
                 "grad_accum": math.ceil(self.effective_batch / self.micro_batch),
                 "effective_batch": self.effective_batch, "oom_recoveries": self.recoveries,
                 "recent_losses": self.recent_losses[-50:], "total_steps": self.total_steps,
                 "world_size": 1, "global_batch": self.effective_batch}
        meta = {"reason": reason, "config": self.config.model_dump(), "model": self.model_spec,
                "model_path": str(self.resolved.path), "data": str(Path(self.job.data).resolve()),
                "data_sha256": self.data_sha256,
                "val_data": str(Path(self.job.val_data).resolve()) if self.job.val_data else None,
                "output_dir": str(Path(self.job.output_dir).resolve()), "versions": {**versions(), **_mlx_versions()},
                "world_size": 1, "adapter": self.loaded.adapter_config}
        try:
            path = mlx_ckpt.save(self.job.output_dir, self.step, model=self.model, optimizer=self.optimizer,
                                 schedule=mlx_ckpt.ScheduleState(self.step, self.config.warmup_steps,
                                                                 self.total_steps),
                                 trainer_state=state, meta=meta, keep=self.config.keep_checkpoints)
        except DiskFullError:
            self.guard.stop()
            self._write_run_json(status="disk_full", exit_code=DiskFullError.exit_code, step=self.step)
            raise
        self.last_checkpoint = path
        self.emit(CheckpointSaved(self.step, path, reason, time.perf_counter() - started))
        return path

    def save_final(self) -> Path:
        from memfit.mlx.adapters import write_final

        extra = {"model": self.model_spec, "base_model_path": str(self.model_dir), "memfit_engine": "mlx",
                 "quantization": self.loaded.config.get("quantization")}
        final, notes = write_final(self.job.output_dir, self.model, self.loaded.adapter_config, self.tokenizer,
                                   base=str(self.model_dir), extra=extra, peft=self.export_peft)
        for note in notes:
            self.emit(Notice(note, "warning"))
        return final

    def evaluate(self) -> None:
        from memfit.mlx.evaluate import dataset_loss

        self.model.eval()
        val_loss, count, _ = dataset_loss(self.model, self.val_dataset, self.pad_id, self.micro_batch)
        self.model.train()
        self.emit(EvalEnd(self.step, val_loss, math.exp(min(val_loss, 50.0)), count))

    def memory_report_text(self, sample) -> str:
        from memfit.guard import memory_report

        text = memory_report(sample, self.limit, self.config.memory_threshold, self.guard.peak_watched_bytes)
        extra = mlx_memory.report_lines(sample) if isinstance(sample, mlx_memory.MlxMemorySample) else ""
        if not extra:
            return text
        lines = text.split("\n")
        return "\n".join(lines[:-1] + [extra, lines[-1]])

    # --- the loop ----------------------------------------------------------------------------------------------

    def run(self) -> RunEnded:
        config = self.config
        trainable, total = self.loaded.counts()
        self.emit(RunStarted(self.job.output_dir, self.step, self.total_steps, self.resolved.name, self.device,
                             self.loaded.dtype, trainable, total, self.limit.limit_bytes,
                             self.estimate.total_bytes if self.estimate is not None else None))
        self.last_checkpoint = None
        # The first step's MLX peak is checked against the run-ahead bound (_check_run_ahead_bound): from here MLX's
        # counter holds the steps' own peak, not the load's or an earlier run's in this process (a library caller's,
        # a test's). run.json has kept the load's: setup wrote it (peak_mlx_bytes).
        mlx_memory.reset_peak()
        sample, events = self.guard.end_step(self.step)
        self._emit_guard(events)
        status = "done"
        while self.step < self.total_steps and not self._should_stop():
            rows_index = self.row_order.rows(self.samples_seen, self.effective_batch)
            started = time.perf_counter()
            outcome = self._run_step_with_recovery(rows_index)
            if outcome in ("oom", "oom_in_update"):
                status = "oom"
                break
            if outcome == "aborted":
                break
            self.step += 1
            self.samples_seen += self.effective_batch
            self.allocator.step_end()  # MEMFIT_MALLOC=trim: part of the step's time, as on the torch engine
            elapsed = time.perf_counter() - started
            self.guard.note_step_time(elapsed)
            sample, events = self.guard.end_step(self.step)
            if self.step == self.start_step + 1:
                self._check_run_ahead_bound(sample)
            self._step_done(outcome, elapsed, sample)
            self._emit_guard(events)
            if self.val_dataset and config.eval_every and self.step % config.eval_every == 0:
                self.evaluate()
            if self.step % config.memory_report_interval == 0 and self.step < self.total_steps:
                self.emit(MemoryReport(self.step, self.memory_report_text(sample)))
            if self.step % config.save_every == 0 and self.step < self.total_steps and not self.job.trial:
                self.save("periodic")
            if self.job.reload_after and self.step - self.start_step >= self.job.reload_after \
                    and self.step < self.total_steps and not self._should_stop():
                status = "reload"
                break
        if status not in ("oom", "reload") and self.interrupted:
            status = "interrupted"
        elif status not in ("oom", "reload") and self.guard.stop_requested:
            status = "guard_stop"
        return self._finish(status)

    def _check_run_ahead_bound(self, sample) -> None:
        rebound = mlx_memory.rebound_if_missed(self.mlx_limits, sample.mlx_peak_bytes or 0)
        if rebound is not None:
            self.mlx_limits = rebound
            self.emit(Notice(f"the estimate was below this step's need (MLX waited before every op past its limit): "
                             f"{rebound.describe()}", "warning"))

    def _step_done(self, stats: dict[str, Any], elapsed: float, sample) -> None:
        self.step_times = (self.step_times + [elapsed])[-20:]
        ce = stats["loss"]
        loss = ce
        if self.config.loss == "distrust" and self.config.distrust_mode == "add":
            loss += stats["distrust_term"]
        self.recent_losses = (self.recent_losses + [loss])[-50:]
        window = self.recent_losses[-20:]
        times = self.step_times[1:] if len(self.step_times) > 1 else self.step_times
        steps_per_s = len(times) / max(sum(times), 1e-9)
        memory = {key: value for key, value in vars(sample).items() if key != "time" and value is not None}
        self.emit(StepEnd(
            step=self.step, total_steps=self.total_steps, loss=loss, avg_loss=sum(window) / len(window), ce=ce,
            # The rate the next step uses, as the torch engine logs it (its scheduler has stepped by then).
            lr=float(self.schedule(mx.array(self.step))), grad_norm=stats["grad_norm"], tokens=stats["tokens"],
            step_time_s=elapsed, tokens_per_s=stats["tokens"] / max(elapsed, 1e-9), steps_per_s=steps_per_s,
            eta_s=(self.total_steps - self.step) / steps_per_s, micro_batch=self.micro_batch,
            grad_accum=stats["micro_batches"], watched_bytes=sample.window_peak_bytes or sample.watched_bytes,
            memory=memory, distrust_term=stats["distrust_term"]))

    def _emit_guard(self, events) -> None:
        for event in events:
            if event.kind == "threshold":
                mlx_memory.clear_cache()  # the guard released Python's and the C heap's; MLX keeps its own cache
            self.emit(GuardNotice(event.kind, event.step, event.watched_bytes, event.message))

    def _finish(self, status: str) -> RunEnded:
        final_dir = None
        if self.job.trial:
            pass
        elif status == "done":
            if self.val_dataset and not (self.config.eval_every and self.step % self.config.eval_every == 0):
                self.evaluate()
            self.save("end")
            final_dir = self.save_final()
        elif self.update_pending:  # an update that failed part-way: its arrays are not a step's to save
            newest = ckpt.latest_checkpoint(self.job.output_dir)
            self.last_checkpoint = newest.path if newest else None
        else:
            self.save({"guard_stop": "memory limit", "oom": "out of memory", "interrupted": "interrupted",
                       "reload": "reload"}[status])
        self.guard.stop()
        ending = mlx_memory.read_mlx_memory()
        report = self.memory_report_text(ending)
        exit_code = {"done": EXIT_OK, "guard_stop": EXIT_GUARD_STOP, "oom": EXIT_OOM,
                     "interrupted": EXIT_INTERRUPTED, "reload": EXIT_RELOAD}[status]
        resume = (None if status in ("done", "reload") or self.job.trial or self.last_checkpoint is None
                  else f"memfit train --engine mlx --resume {self.last_checkpoint}")
        message = {
            "done": f"finished {self.step} steps",
            "guard_stop": f"stopped by the memory guard at step {self.step}: {self.guard.stop_reason}",
            "oom": f"out of memory at step {self.step + 1} with micro-batch {self.micro_batch}"
                   + (" in its optimizer update (nothing saved from it)" if self.update_pending else ""),
            "interrupted": f"interrupted ({self.interrupted}) at step {self.step}",
            "reload": f"reloading at step {self.step} (--reload-interval {self.job.reload_after})",
        }[status]
        self._write_run_json(status=status, exit_code=exit_code, step=self.step,
                             finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                             checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
                             final_dir=str(final_dir) if final_dir else None, peak_rss_bytes=ending.peak_rss_bytes,
                             guard_thread_cpu_s=round(self.guard.sampler.thread_cpu_s, 4))  # as the torch loop's
        ended = RunEnded(status, exit_code, self.step, self.total_steps, message, self.last_checkpoint, final_dir,
                         resume, report, self.recoveries)
        self._release_arrays()
        self.emit(ended)  # the entry point writes the run report as this reaches it (memfit.report.report_at_end)
        return ended

    def _release_arrays(self) -> None:
        """Everything is saved: drop the model, its optimizer state and the compiled steps that capture them, and
        give MLX's buffers back, so that the run report (drawn as RunEnded reaches the entry point, with its plotting
        library) is drawn in memory the model held instead of on top of it."""
        import gc

        self.model = self.optimizer = self.loaded = None
        self._accumulate = self._update = self._clip_and_update = self._loss = self._state = None
        gc.collect()  # the compiled steps' closures hold the model in reference cycles
        mlx_memory.clear_cache()


def _mlx_versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for package in ("mlx", "mlx-lm"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def train_mlx(job, config: TrainConfig, on_event: Callable[[Event], None] | None = None, **options) -> RunEnded:
    """Train as `config` says on MLX; returns how it ended (exit code included). `job` is memfit.train.TrainJob.
    SIGINT/SIGTERM stop at the next safe point with a checkpoint; a second signal aborts at once. `options`:
    use_dora, group_size (for --quant), export_peft, compile_step."""
    trainer = MlxTrainer(job, config, on_event, **options)

    with signals_handled(stop_then_abort(trainer)):
        try:
            trainer.setup()
            return trainer.run()
        finally:
            guard = getattr(trainer, "guard", None)
            if guard is not None:
                guard.stop()
            limits = getattr(trainer, "mlx_limits", None)
            if limits is not None:
                mlx_memory.restore_limits(limits)
