"""The training loop: accelerate for precision, accumulation and (later) many processes; the guard around it.

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

Several processes (torchrun / accelerate launch; memfit.distributed): one optimizer step takes
`batch_size x grad_accum x world_size` rows of the same global row order; every rank computes the step objective
over all of them (so token weights are normalised over the global step, without communication) and trains its
share (`ranks.shard_rows`). The safe points become agreements (memfit.distributed.collective, which says why the
micro-batches run without DDP's in-backward all-reduce and the gradients are summed once at step end): a stop, an
OOM recovery or an interrupt on any rank is taken by all of them at the same point. Rank 0 alone prints and writes
the run directory and the checkpoints. One process takes none of these paths: no collective, the same loop.

Sharded engines. `--distributed fsdp` on several processes: memfit shards the model itself with FSDP2
(memfit.distributed.fsdp; CPU/gloo and CUDA), the model is not given to accelerate (no DDP around it), each
micro-batch's backward reduce-scatters its gradients (summed, not averaged), only the step's loss is all-reduced,
and checkpoints gather the full trainable and optimizer states to rank 0 in the one-process format.
`--distributed zero1|zero2|zero3` (CUDA, also one process: ZeRO-Offload): DeepSpeed's engine from
`accelerator.prepare`, `accelerator.backward(loss, scale_wrt_gas=False)` (memfit weights its micro-batches itself)
with the accumulation boundary set on the last micro-batch, where the engine clips and steps; its checkpoint is
`accelerator.save_state` (each rank its partition) inside memfit's. Both engines run collectives inside forward
and backward, so an out-of-memory error there is not recovered in-process: that rank exits 4 at once and the
launcher ends the others (memfit.distributed.collective says why); the guard's stops, which come before the limit
and at agreed safe points, work as under DDP.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from memfit import faults
from memfit.allocator import DEFAULT_POLICY as DEFAULT_ALLOCATOR_POLICY
from memfit.allocator import configure as configure_allocator
from memfit.config import GUARD_FIELDS, TrainConfig, saved_config_values
from memfit.runtime import default_device
from memfit.distributed.collective import Agreement, Decision, all_reduce_sum, gradients
from memfit.distributed.collective import leave as leave_process_group
from memfit.distributed.ranks import current as current_ranks
from memfit.distributed.ranks import shard_rows
from memfit.errors import (EXIT_GUARD_STOP, EXIT_INTERRUPTED, EXIT_OK, EXIT_OOM, EXIT_RELOAD, DiskFullError,
                           OutOfMemoryError, UserError)
from memfit.train import checkpoint as ckpt
from memfit.events import (CheckpointSaved, EvalEnd, Event, GuardNotice, MemoryReport, Notice, OomRecovered,
                           RunEnded, RunStarted, StepEnd)
from memfit.train.rundir import FINAL, RunDir, check_fresh_output_dir, versions
from memfit.train.tblog import TensorBoardSink

# Options that may change on resume without breaking exactness (the micro-batch split may change too, as long as
# batch_size x grad_accum stays the same: the step's objective does not depend on it).
RESUME_FREE_FIELDS = GUARD_FIELDS | {"batch_size", "grad_accum", "attn_implementation", "chunked_loss", "compile",
                                     "log_every"}
# Reading the loss back waits for the device to finish the step; on CUDA/MPS that is done about this often (CPU
# ops have run by the time they return, so there it costs nothing and every step is logged at once).
LOG_INTERVAL_S = 0.5


@dataclass
class TrainJob:
    """What to train on, besides the config."""

    model: str
    data: Path
    output_dir: Path
    val_data: Path | None = None
    device: str | None = None
    resume: ckpt.Checkpoint | None = None
    force: bool = False  # resume even when the config changed in a way that breaks exactness
    # A probe trial (memfit.probe): measure memory, not learn. It trains the run's own first batches, and puts a
    # row of the longest length into its last one if that has none (where activations dominate, a step's peak is
    # set by its longest row, padding included). Not batches of only the longest rows: one repeated shape lets the
    # allocator reuse every block, and that read low against the real run (tiny model, batch 16: 578 against
    # 590 MB), which then stopped at a limit the probe had said it fits. An out-of-memory
    # error ends the run instead of being recovered (the probe wants to know), and nothing is checkpointed.
    trial: bool = False
    # Set by `memfit train --supervise` for the child it runs (memfit.train.supervisor):
    max_micro_batch: int | None = None  # after the child was OOM-killed: its next life starts at most this small
    reload_after: int | None = None  # --reload-interval: checkpoint and end (exit 75) after this many steps
    attempt: int | None = None  # which life of the supervised run this is (0: the first); in every metrics line
    fresh_restart: bool = False  # the first life died before any checkpoint: start over in its output dir


# How a run ended is the loop's last event; `train()` returns it too.
TrainResult = RunEnded


class _StepAborted(Exception):
    """A stop was requested between micro-batches, or inside one at a decoder layer's entry (then the message says
    where): the step is dropped, the checkpoint holds the one before."""


class _ShardedOom(Exception):
    """Out of memory inside a sharded engine's micro-batch, whose forward/backward hold collectives."""


class _OomAgreed(Exception):
    """Several processes: a rank ran out of memory in this step; every rank drops the step and retries it smaller."""


# Launchers forward the terminal's Ctrl-C to workers that already got it: a second signal this soon after the first
# is the same request, not an "abort now".
REPEATED_SIGNAL_S = 2.0


def layer_stop_hook(trainer: "Trainer", guard, index: int, layers: int) -> Callable[..., None]:
    """The forward pre-hook on decoder layer `index`: the step abort when the guard has asked to stop and a
    training micro-batch is running (two attribute reads: no lock, no call, no syscall)."""

    def before_layer(module, args) -> None:
        if guard.stop_now and trainer.in_micro_batch is not None:
            step, _, micro_batch = trainer.in_micro_batch
            raise _StepAborted(f"step {step} cut short inside micro-batch {micro_batch}, before decoder layer "
                               f"{index + 1} of {layers}")

    return before_layer


def _single_process_rendezvous() -> None:
    """DeepSpeed in one process without a launcher (ZeRO-Offload on one GPU): the variables torchrun would set, so
    accelerate initialises DeepSpeed's process group of one (without them deepspeed looks for MPI)."""
    import os
    import socket

    if os.environ.get("LOCAL_RANK") not in (None, ""):
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                        "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(name, value)


def resume_conflicts(saved: dict[str, Any], config: TrainConfig, world_size: int = 1,
                     saved_world_size: int = 1) -> list[str]:
    """Differences between a checkpoint's config and this one that would make the resumed run differ from an
    uninterrupted one. A different number of processes changes the global batch (and its row order)."""
    now = config.model_dump()
    # A key an older memfit did not write had its default then, or the value memfit.config.saved_config_values
    # gives where the default changed with the key (a k-bit base was upcast: qlora_upcast True).
    saved = saved_config_values(saved)
    saved = {key: saved.get(key, TrainConfig.model_fields[key].default) for key in now} | saved
    changed = [f"--{key.replace('_', '-')} {saved.get(key)!r} -> {now[key]!r}"
               for key in now if key not in RESUME_FREE_FIELDS and saved.get(key) != now[key]]
    if saved.get("batch_size", 1) * saved.get("grad_accum", 1) != config.batch_size * config.grad_accum:
        changed.append(f"effective batch {saved.get('batch_size', 1) * saved.get('grad_accum', 1)} -> "
                       f"{config.batch_size * config.grad_accum} (batch-size x grad-accum)")
    if saved_world_size != world_size:
        changed.append(f"world size {saved_world_size} -> {world_size} (processes; the global batch is "
                       "batch-size x grad-accum x world size)")
    return changed


# A resume's limit leaves this much room above the higher of the estimate and the peak the guard saw.
RESUME_HEADROOM = 1.25
# ... and stays under this share of what was available when the run started (the OS and others keep the rest).
RESUME_CEILING = 0.95


def resume_fix(limit_bytes: int, available_bytes: int, peak_bytes: int, estimate_bytes: int | None,
               micro_batch: int, effective_batch: int, largest_micro_batch: Callable[[int, int], int]) -> str:
    """The flags that let a run stopped by the guard resume and go on: a higher --max-memory where this machine
    has it (the highest of the limit, the estimate and the peak seen, plus room), else a smaller micro-batch that the estimate
    fits under the same limit, with the accumulation that keeps the effective batch (a free change on resume);
    "" when neither exists."""
    # The guard may stop before the limit (a leak it sees coming): the new limit is above the old one regardless.
    needed = int(max(peak_bytes, estimate_bytes or 0, limit_bytes) * RESUME_HEADROOM)
    if needed <= available_bytes * RESUME_CEILING:
        return f" --max-memory {math.ceil(needed / 1024**3 * 100) / 100:.2f}"
    if micro_batch > 1:
        largest = largest_micro_batch(limit_bytes, micro_batch)
        if largest >= 1:
            micro = max(size for size in range(1, min(largest, micro_batch - 1) + 1) if effective_batch % size == 0)
            return f" --batch-size {micro} --grad-accum {effective_batch // micro}"
    return ""


class Trainer:
    # The guard's stop at decoder-layer entries (one process, no sharded engine, no torch.compile). A class
    # attribute so that benchmarks/guard_stop_overshoot.py can measure the overshoot without it.
    stop_at_layers = True

    def __init__(self, job: TrainJob, config: TrainConfig, on_event: Callable[[Event], None] | None = None):
        self.job, self.config = job, config
        self.ranks = current_ranks()
        self.distributed = self.ranks.distributed
        # Sharded engines (see the module docstring); one process of `--distributed fsdp` is not sharded.
        self.fsdp = self.distributed and config.distributed == "fsdp"
        self.deepspeed = config.distributed in ("zero1", "zero2", "zero3")
        self.sharded = self.fsdp or self.deepspeed
        # Only rank 0 reports (the renderer, the run directory); the others train and keep quiet.
        self.sinks = [on_event] if on_event and self.ranks.is_main else []
        self.decision = Decision()  # what the ranks last agreed (one process: its own flags)
        self.interrupted: str | None = None
        self.recoveries = 0
        self.recent_losses: list[float] = []
        self.step_times: list[float] = []
        self.pending_steps: list[dict[str, Any]] = []  # finished steps whose loss is still on the device
        self.last_flush = time.perf_counter()
        self.last_checkpoint: Path | None = None  # written by this process
        # The training micro-batch running now, (step, attempt, micro-batch), 1-based; None outside one (evaluation,
        # checkpoints). The layer hooks act only inside one.
        self.in_micro_batch: tuple[int, int, int] | None = None
        self.layer_count, self.layer_stops = 0, False

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
        if self.distributed:
            self._check_distributed()
        if self.device == "cuda":
            cuda_alloc_conf_env()  # before the first CUDA allocation, or the allocator ignores it
            if self.distributed:
                torch.cuda.set_device(self.ranks.local_rank)  # each rank its own GPU, before the guard reads one
        self.allocator = configure_allocator()
        main = self.ranks.is_main
        if job.resume is None and job.fresh_restart:
            RunDir(job.output_dir).truncate_metrics_after(0)  # the dead life's steps are trained again
        elif job.resume is None:
            if main:  # rank 0 writes run.json soon: another rank checking after that would see a run there
                check_fresh_output_dir(job.output_dir)
        else:
            saved_world = int(job.resume.meta.get("world_size", 1))
            conflicts = resume_conflicts(job.resume.meta.get("config", {}), config, self.ranks.world_size,
                                         saved_world)
            # An FSDP checkpoint holds full states (the one-process format): --force may change the world size.
            # DeepSpeed's holds each rank's partition.
            if saved_world != self.ranks.world_size and job.force and self.deepspeed:
                raise UserError(f"{job.resume.path} holds {config.distributed} shards of {saved_world} processes; "
                                f"this run has {self.ranks.world_size}", hint=f"launch {saved_world} processes")
            if conflicts and not job.force:
                raise UserError(f"resuming {job.resume.path} with a changed config breaks exactness: "
                                f"{'; '.join(conflicts)}", hint="keep the checkpoint's settings, or add --force")
        self.precision = resolve_precision(config.dtype, self.device)
        self.resolved = resolve_model(job.model)
        if config.max_memory is not None and not self.distributed and not job.trial:
            self._check_limit()
        # A local dir is recorded absolute, so `--resume` and `-c config.yaml` work from any directory.
        self.model_spec = str(Path(job.model).resolve()) if Path(job.model).is_dir() else job.model
        model_dir = self.resolved.require_weights()
        self._load_data(model_dir)

        self.run_dir = RunDir(job.output_dir, {} if job.attempt is None else {"attempt": job.attempt})
        if main:
            self.sinks.insert(0, self.run_dir)
            if config.tensorboard:  # before the model loads: a missing package fails in seconds
                self.sinks.append(TensorBoardSink(job.output_dir))
            for path in ckpt.remove_partial_checkpoints(job.output_dir):
                self.emit(Notice(f"removed {path.name}: a checkpoint write that did not finish", "warning"))
        self._start_guard()
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
        config, world = self.config, self.ranks.world_size
        if config.supervise or self.job.max_micro_batch or self.job.reload_after:
            raise UserError(f"--supervise runs one process; this is rank {self.ranks.rank} of {world}",
                            hint="drop --supervise (torchrun --max-restarts restarts failed workers)")
        from memfit.distributed.engines import check_engine

        check_engine(config, self.device, world)  # DeepSpeed on CPU, impossible combinations: one line

    def _load_data(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        from memfit.data import build_dataset, pad_token_id

        job, config = self.job, self.config
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.pad_id = pad_token_id(self.tokenizer)
        distrust = config.loss == "distrust"
        self.dataset = build_dataset(job.data, self.tokenizer, config.seq_len, config.packing, distrust)
        self.val_dataset = (build_dataset(job.val_data, self.tokenizer, config.seq_len, config.packing, distrust)
                            if job.val_data else None)
        self.data_sha256 = ckpt.sha256_file(Path(job.data))
        if job.resume is not None and job.resume.meta.get("data_sha256") not in (None, self.data_sha256) \
                and not job.force:
            raise UserError(f"{job.data} changed since checkpoint {job.resume.path} was written",
                            hint="resume with the same data file, or add --force")
        self.emit(Notice(f"data: {self.dataset.stats.summary()}"))
        if self.val_dataset:
            self.emit(Notice(f"validation: {self.val_dataset.stats.summary()}"))
        self.effective_batch = config.batch_size * config.grad_accum  # per rank
        self.global_batch = self.effective_batch * self.ranks.world_size  # rows per optimizer step, all ranks
        self.micro_batch = config.batch_size
        rows = len(self.dataset.rows)
        self.longest_row = max(range(rows), key=self._row_length)
        from memfit.data import RowOrder

        # Packed blocks are nearly all seq-len long: grouping them would only reorder; the seeded order is kept.
        grouped = config.group_by_length and not self.dataset.stats.packed
        self.row_order = RowOrder([len(row.input_ids) for row in self.dataset.rows], config.seed,
                                  self.global_batch, grouped)
        self.total_steps = config.max_steps or max(1, math.ceil(config.epochs * rows / self.global_batch))

    def _start_guard(self) -> None:
        from memfit.guard import Guard, choose_limit, configure_cuda

        device, fraction = self.device, 0.8
        if self.distributed:
            if device == "cuda":
                device = f"cuda:{self.ranks.local_rank}"
            else:  # the ranks of a machine share its RAM: each takes its part of the auto limit
                fraction /= self.ranks.local_world_size
        self.limit = choose_limit(self.config.max_memory, device, fraction)
        self.emit(Notice(self.limit.describe() + (f"; per rank ({self.ranks.world_size} ranks, each guards its own "
                                                  "memory)" if self.distributed else "")))
        if self.allocator.policy != DEFAULT_ALLOCATOR_POLICY:  # MEMFIT_MALLOC took effect (or could not, off glibc)
            self.emit(Notice(self.allocator.describe()))
        configure_cuda(self.limit)
        self.guard = Guard(self.limit, threshold=self.config.memory_threshold,
                           interval_s=self.config.memory_sample_interval)
        self.guard.start()

    def _build(self, model_dir: Path) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from transformers import get_cosine_schedule_with_warmup

        from memfit.train.model import load_model
        from memfit.train.optim import build_optimizer

        config = self.config
        set_seed(config.seed)
        self.accelerator = Accelerator(mixed_precision=self.precision.accelerate_mixed_precision,
                                       cpu=self.device == "cpu", **self._accelerator_kwargs())
        if self.accelerator.num_processes != self.ranks.world_size:
            raise UserError(f"accelerate sees {self.accelerator.num_processes} processes, the launcher "
                            f"{self.ranks.world_size}", hint="launch with torchrun or accelerate launch")
        self.agreement = Agreement(self.ranks)
        model = self._load_model(load_model, model_dir)
        model.train()
        self.fsdp_model = None
        if self.fsdp:  # before the optimizer: sharding replaces the parameters with DTensors
            from memfit.distributed.fsdp import shard

            units = shard(model, config, self.precision)
            self.fsdp_model = model
            self.emit(Notice(f"fsdp: {units} units fully sharded over {self.ranks.world_size} ranks "
                             f"({torch.distributed.get_backend()})"))
        optimizer = build_optimizer(config.optimizer, model.parameters(), config.lr)
        self.scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, self.total_steps)
        self._choose_step_path(model)
        if config.compile:
            model = torch.compile(model, dynamic=True)  # rows vary in length: one graph for all of them
        if self.fsdp:
            # Not through accelerate.prepare: it would wrap the sharded model in DDP on CPU processes.
            self.model, self.optimizer = model, optimizer
        else:  # one process, DDP, or DeepSpeed (which returns its engine and optimizer wrapper)
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.trainable = [param for param in self.model.parameters() if param.requires_grad]
        self._install_layer_hooks()

    def _install_layer_hooks(self) -> None:
        """The guard's stop at each decoder layer's entry, and the fault hooks (memfit.faults) on the same layers.

        The stop hook raises the step abort when the guard has asked to stop: the step in flight is dropped at the
        next layer instead of running to its end (with one micro-batch per step, the first safe point would be the
        step end). Only in one process without a sharded engine: elsewhere a rank leaving the forward pass alone
        would leave the others waiting in a collective, and the stop goes through the ranks' agreement at the safe
        points. Not under torch.compile: dynamo would trace the attribute read as a constant.
        """
        from memfit.models.arch import decoder_layers

        layers = decoder_layers(self.accelerator.unwrap_model(self.model))
        self.layer_count = len(layers)
        if layers and faults.layer_faults_active():
            faults.install_layer_faults(layers, lambda: self.in_micro_batch)
        self.layer_stops = bool(layers) and self.stop_at_layers and not (
            self.distributed or self.sharded or self.config.compile)
        if self.layer_stops:
            for index, layer in enumerate(layers):
                layer.register_forward_pre_hook(layer_stop_hook(self, self.guard, index, len(layers)))

    def _accelerator_kwargs(self) -> dict[str, Any]:
        """One process: none. Several: the engine's plugin (memfit.distributed.engines), and gloo for CPU processes
        (accelerate would pick MPI where torch has it)."""
        if not self.distributed and not self.deepspeed:
            return {}
        from accelerate.utils import InitProcessGroupKwargs

        from memfit.distributed.engines import accelerator_kwargs

        # FSDP: no plugin (memfit.distributed.fsdp shards the model itself; accelerate's plugin does nothing on CPU).
        kwargs = {} if self.fsdp else dict(accelerator_kwargs(self.config, self.device))
        if self.deepspeed and not self.distributed:
            _single_process_rendezvous()
        if self.device == "cpu":
            kwargs["kwargs_handlers"] = [*kwargs.get("kwargs_handlers", []), InitProcessGroupKwargs(backend="gloo")]
        return kwargs

    def _choose_step_path(self, model) -> None:
        """The chunked loss and leak-free packing, where this model allows them (a notice says when not)."""
        from memfit.models.attention import packing_isolated
        from memfit.train.chunked_loss import chunked_loss_blocker, head_returns_hidden

        self.head, self._head_bypass = None, None
        if self.config.chunked_loss:
            blocker = chunked_loss_blocker(model)
            if self.config.distributed == "zero3" and self.deepspeed:
                # The chunked loss reads the head's weight after the model's forward; ZeRO-3 has released it.
                blocker = "ZeRO-3 partitions the lm_head weight outside the model's forward"

            if blocker:
                self.emit(Notice(f"chunked loss off: {blocker}; computing full logits", "warning"))
            else:
                # For the whole run: the model returns hidden states and the loss goes through the head by chunks.
                self._head_bypass = head_returns_hidden(model)
                self.head = self._head_bypass.__enter__()
        self.position_packing = packing_isolated(model)
        if self.dataset.stats.packed and not self.position_packing:
            self.emit(Notice(f"{model.config.model_type}: packed samples can attend to each other in this "
                             "architecture (no position-id isolation); use --no-packing to avoid it", "warning"))

    def restore_head(self) -> None:
        """The model computes logits again (after the run, for whoever holds it)."""
        bypass, self._head_bypass = getattr(self, "_head_bypass", None), None
        if bypass is not None:
            bypass.__exit__(None, None, None)

    def _model_inputs(self, batch) -> dict[str, Any]:
        """What the model gets, on its device (only these tensors are copied there). Causal attention needs no mask
        for right padding: real tokens never see the pads after them. Packed rows restart their position ids at
        each sample, which transformers turns into a block-diagonal mask."""
        if not batch.packed:
            extra = {}
        elif self.position_packing:
            extra = {"position_ids": batch.position_ids}
        else:
            extra = {"attention_mask": batch.attention_mask}
        device = self.accelerator.device
        # use_cache=False: with a KV cache, transformers ignores the position-id boundaries (memfit.models.attention).
        return {"input_ids": batch.input_ids.to(device), **{name: tensor.to(device) for name, tensor in extra.items()},
                "use_cache": False}

    def _restore(self, checkpoint: ckpt.Checkpoint) -> None:
        config = self.config
        for note in checkpoint.recovered:
            self.emit(Notice(f"checkpoint {note}", "warning"))
        for problem in checkpoint.skipped:
            self.emit(Notice(f"skipped {problem}; using the newest checkpoint that verifies", "warning"))
        load_states = None
        if self.fsdp:
            from memfit.distributed.fsdp import load

            def load_states(tensors, optimizer_state):
                load(self.fsdp_model, self.optimizer, tensors, optimizer_state)
        elif self.deepspeed:
            # The engine's own state (each rank its partition: weights, fp32 masters, optimizer) is the exact one;
            # the gathered trainable tensors beside it are for reading, not for resuming.
            self.accelerator.load_state(str(checkpoint.path / ckpt.ENGINE_DIR))

            def load_states(tensors, optimizer_state):
                pass
        state = ckpt.restore(checkpoint, model=self.accelerator.unwrap_model(self.model),
                             optimizer=self.optimizer, scheduler=self.scheduler, rank=self.ranks.rank,
                             load_states=load_states)
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self.recoveries = state.get("oom_recoveries", 0)
        self.recent_losses = state.get("recent_losses", [])
        if config.batch_size * config.grad_accum == state.get("effective_batch") \
                and checkpoint.meta["config"].get("batch_size") == config.batch_size:
            self.micro_batch = state.get("micro_batch", config.batch_size)  # keep an OOM-reduced micro-batch
        if self.ranks.is_main:
            self.run_dir.truncate_metrics_after(self.step)
        self.emit(Notice(f"resumed from {checkpoint.path} at step {self.step} of {self.total_steps}"))

    def _load_model(self, load_model, model_dir: Path):
        from memfit.guard import is_out_of_memory

        failure = None
        try:
            return load_model(model_dir, self.config, self.precision, self.device,
                              notify=lambda line: self.emit(Notice(line)))
        except Exception as error:  # noqa: BLE001 - only out-of-memory is turned into a message
            if not is_out_of_memory(error):
                raise
            failure = " ".join(str(error).split())[:200]
        raise OutOfMemoryError(f"out of memory while loading {self.job.model} on {self.device}: {failure}",
                               hint="see `memfit estimate` for the weights' size; --method qlora or a smaller model")

    def _estimate_bytes(self) -> int | None:
        from memfit.distributed.engines import estimated_sharding
        from memfit.estimate.memory import Hardware, estimate_memory

        try:
            # Several processes: the estimate of one rank (--num-gpus world --zero N --offload), what each measures.
            zero, engine = estimated_sharding(self.config) if self.distributed else (0, "deepspeed")
            hardware = Hardware(self.device, self.limit.limit_bytes, self.ranks.world_size, zero,
                                self.config.offload if self.distributed else "none", engine)
            return estimate_memory(self.resolved.config, self.config, hardware, self.resolved.name).total_bytes
        except Exception:  # the estimate is context for the report; training does not depend on it
            return None

    def _check_limit(self) -> None:
        """--max-memory below the estimated peak of micro-batch 1: refused before anything loads or is written
        (unless --force); above all the memory the device has: a warning (the guard would never trigger). Here,
        in the training process (which imports torch anyway), not in a supervisor that lives as long as the run.
        A probe's trial is checked by its parent; ranks of a launch each guard their own share."""
        from memfit.estimate.limit import batch_one_estimate, check_limit

        try:
            needed = batch_one_estimate(self.resolved.config, self.config, self.device)
        except UserError:
            raise
        except Exception:  # noqa: BLE001 - the estimator cannot read this model: the run goes on unchecked
            needed = None
        for warning in check_limit(self.config.max_memory, needed, self.device, self.job.force).warnings:
            self.emit(Notice(warning, "warning"))

    def _resume_flags(self, status: str) -> str:
        """After a guard stop: what makes the resume fit (from the estimate and the peak seen), else nothing."""
        if status != "guard_stop" or self.distributed:
            return ""
        try:
            return resume_fix(self.limit.limit_bytes, self.limit.available_bytes, self.guard.peak_watched_bytes,
                              self.estimate, self.micro_batch, self.effective_batch, self._largest_micro_batch)
        except Exception:  # noqa: BLE001 - advice for the printed command; the stop and its checkpoint stand
            return ""

    def _largest_micro_batch(self, limit_bytes: int, below: int) -> int:
        """The largest micro-batch under `below` whose estimate fits in `limit_bytes` (0: not even 1)."""
        from memfit.estimate.memory import Hardware, solve_max_batch

        hardware = Hardware(self.device, limit_bytes)
        return solve_max_batch(self.resolved.config, self.config, hardware, limit=max(1, below - 1)).batch

    def _write_run_json(self, **status: Any) -> None:
        from memfit.system import detect

        if not self.ranks.is_main:
            self.estimate = getattr(self, "estimate", None)
            return
        data = self.run_dir.read_run_json()
        if "config" not in data:
            # A probe trial estimates too, though its parent has the figure: the trial is to hold what a run holds.
            self.estimate = self._estimate_bytes()
            data.update({
                "config": self.config.model_dump(), "model": self.job.model, "model_path": str(self.resolved.path),
                "data": str(self.job.data), "data_sha256": self.data_sha256,
                "val_data": str(self.job.val_data) if self.job.val_data else None,
                "data_stats": vars(self.dataset.stats), "device": self.device, "precision": self.precision.name,
                "versions": versions(), "hardware": detect().to_dict(),
                "limit": {"bytes": self.limit.limit_bytes, "auto": self.limit.auto,
                          "available_bytes": self.limit.available_bytes},
                "estimate_bytes": self.estimate, "total_steps": self.total_steps,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "world_size": self.ranks.world_size,
                "distributed": ("ddp" if self.config.distributed == "auto" else self.config.distributed)
                if self.distributed else None,
            })
            self.run_dir.write_config({"model": self.model_spec, "data": str(Path(self.job.data).resolve()),
                                       "output_dir": str(Path(self.job.output_dir).resolve()),
                                       **self.config.model_dump()})
        else:
            self.estimate = data.get("estimate_bytes")
        if "peak_rss_bytes" in status:  # a resumed run's peak is the highest of its processes'
            status["peak_rss_bytes"] = max(data.get("peak_rss_bytes") or 0, status["peak_rss_bytes"])
        data.update(status)
        data["peak_watched_bytes"] = max(data.get("peak_watched_bytes") or 0, self.guard.peak_watched_bytes)
        data["oom_recoveries"] = self.recoveries
        self.run_dir.write_run_json(data)

    # --- one optimizer step ------------------------------------------------------------------------------------

    def _should_stop(self) -> bool:
        return self.guard.stop_requested or self.interrupted is not None

    def _stop_agreed(self) -> bool:
        """The step-end safe point: this process's own stop request, or, with several, whether any rank has one."""
        if not self.distributed:
            return self._should_stop()
        return self._agree().stop

    def _agree(self, failure: str | None = None) -> Decision:
        """One agreement of the ranks (memfit.distributed.collective); rank 0 says once when another rank's memory
        reached its threshold (each rank's own guard events stay with it)."""
        guard = self.guard
        self.decision = self.agreement.agree(stop=guard.stop_requested, oom=failure is not None,
                                             interrupted=self.interrupted is not None,
                                             warn=guard.peak_watched_bytes >= guard.threshold_bytes,
                                             watched_bytes=guard.peak_watched_bytes)
        warn_rank = self.decision.warn_rank
        if warn_rank not in (None, self.ranks.rank) and not getattr(self, "_warned_rank", False):
            self._warned_rank = True
            self.emit(Notice(f"rank {warn_rank} reached {self.config.memory_threshold:.0%} of its memory limit "
                             f"(the highest rank's peak so far: {self.decision.max_watched_bytes / 1024**3:.2f} GB)",
                             "warning"))
        return self.decision

    def _agree_in_step(self, failure: str | None = None) -> None:
        """A safe point inside a step with several processes: raises when any rank ran out of memory (all retry the
        step smaller) or asks to stop (all drop the step)."""
        decision = self._agree(failure)
        if decision.oom_rank is not None:
            raise _OomAgreed(failure or f"on rank {decision.oom_rank}")
        if decision.stop:
            raise _StepAborted

    def _train_step(self, rows_index: list[int], attempt: int) -> dict[str, Any]:
        """One optimizer step. Its loss and gradient norm stay on the device (no host sync here)."""
        from memfit.data import collate
        from memfit.guard import is_out_of_memory
        from memfit.train.losses import micro_step_loss, scored_tokens
        from memfit.train.objective import label_weights, step_objective

        # Longest first: micro-batches of similar lengths pad less when the step is split (accumulation, OOM).
        rows = sorted((self.dataset.rows[i] for i in rows_index), key=lambda row: -len(row.input_ids))
        # Over all ranks' rows: the token weights sum to 1 over the global step, so the ranks' losses (and
        # gradients) add up to one process's with the whole batch.
        objective = step_objective(rows, self.dataset.samples, self.config)
        if self.distributed:
            tokens_all = sum(len(row.input_ids) for row in rows)
            mine = shard_rows(rows_index, self._row_length, self.ranks.rank, self.ranks.world_size)
            rows = sorted((self.dataset.rows[i] for i in mine), key=lambda row: -len(row.input_ids))
        chunks = [rows[i:i + self.micro_batch] for i in range(0, len(rows), self.micro_batch)]
        device = self.accelerator.device
        loss_sum = torch.zeros((), device=device)
        tokens = 0
        failure = None
        for number, chunk in enumerate(chunks):
            if self.distributed:
                if number:  # before micro-batch 0 the loop's step-end agreement was just made
                    self._agree_in_step()
            elif self._should_stop():
                raise _StepAborted
            try:
                if not self.layer_count:  # with decoder layers, oom@ fires inside the forward pass (faults.py)
                    faults.maybe_oom(self.step + 1, attempt, number + 1)
                faults.maybe_die(self.step + 1, self.job.output_dir)
                batch = collate(chunk, self.dataset.samples, self.pad_id)
                scored = scored_tokens(batch.labels, label_weights(objective, batch)).to(device)
                inputs = self._model_inputs(batch)
                last = number == len(chunks) - 1
                self.in_micro_batch = (self.step + 1, attempt, number + 1)
                if self.sharded:
                    loss = self._sharded_micro_step(inputs, scored, last)
                else:
                    # no_sync: one process's last micro-batch would all-reduce gradients in backward under DDP;
                    # with several, none does (memfit.distributed.collective: the sum comes after the step-end
                    # agreement).
                    with nullcontext() if last and not self.distributed else self.accelerator.no_sync(self.model):
                        loss = micro_step_loss(self.model, inputs, scored, head=self.head,
                                               compute_dtype=self.precision.compute_dtype)
                        self.accelerator.backward(loss)
                self.in_micro_batch = None
            except Exception as error:  # noqa: BLE001 - several processes: an OOM goes to the agreement
                self.in_micro_batch = None
                if not (self.distributed or self.sharded) or not is_out_of_memory(error):
                    raise
                failure = " ".join(str(error).split())[:200]
                if self.sharded:  # the other ranks may wait in this forward's collectives: no agreement can follow
                    raise _ShardedOom(failure) from None
            if failure is not None:
                break  # to the step-end agreement, with the other ranks' next one (see collective's docstring)
            loss_sum += loss.detach()
            tokens += batch.num_tokens
        if self.deepspeed:
            # The engine stepped in the last micro-batch's backward: a stop agreed now could not undo it, so the
            # step ends here (the loop's step-end agreement comes next). Only the loss is summed.
            if self.distributed:
                all_reduce_sum([loss_sum])
                tokens = tokens_all
        elif self.fsdp:
            self._agree_in_step(failure)
            all_reduce_sum([loss_sum])  # the gradients were reduce-scattered in each backward
            tokens = tokens_all
        elif self.distributed:
            self._agree_in_step(failure)
            all_reduce_sum([*gradients(self.trainable), loss_sum])
            tokens = tokens_all
        grad_norm = None
        if self.config.max_grad_norm:
            if self.fsdp:
                from memfit.distributed.fsdp import clip_grad_norm

                grad_norm = clip_grad_norm(self.trainable, self.config.max_grad_norm)
            else:  # DeepSpeed clipped in its step: accelerate returns the engine's norm (a float, or None)
                grad_norm = self.accelerator.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
                if grad_norm is not None and not isinstance(grad_norm, torch.Tensor):
                    grad_norm = torch.tensor(float(grad_norm), device=device)
        self.optimizer.step()  # DeepSpeed: a no-op (the engine stepped)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        faults.maybe_leak()
        return {"loss_sum": loss_sum, "tokens": tokens, "micro_batches": len(chunks), "grad_norm": grad_norm,
                "distrust_term": objective.distrust_term}

    def _sharded_micro_step(self, inputs: dict[str, Any], scored, last: bool) -> torch.Tensor:
        """One micro-batch's forward and backward under FSDP or DeepSpeed; returns its loss (graph freed)."""
        from memfit.train.losses import micro_step_loss

        loss = micro_step_loss(self.model, inputs, scored, head=self.head, compute_dtype=self.precision.compute_dtype)
        if not self.deepspeed:
            loss.backward()  # FSDP reduce-scatters this micro-batch's gradients into the shards
            return loss
        # accelerate's DeepSpeed backward marks the accumulation boundary from sync_gradients and steps the engine
        # there (clipping, optimizer, zero_grad): only on the last micro-batch. scale_wrt_gas=False: the engine would
        # divide by gradient_accumulation_steps, and memfit's token weights already sum to 1 over the step.
        state = self.accelerator.gradient_state
        state._set_sync_gradients(last)
        try:
            self.accelerator.backward(loss, scale_wrt_gas=False)
        finally:
            state._set_sync_gradients(True)
        return loss

    def _run_step_with_recovery(self, rows_index: list[int]) -> dict[str, Any] | str:
        """The step's stats, or "aborted" / "oom" when it could not finish."""
        from memfit.guard import is_out_of_memory, release_memory

        attempt = 0
        # The torch RNG as the step began (dropout draws from it): a dropped step puts it back, so the checkpoint
        # written after it, and a retry after an OOM, start the step from the same state as an uninterrupted run.
        # Only torch's: nothing in a step draws from Python's or numpy's, whose states cost 7-40x more to copy.
        rng = self._torch_rng_state()
        while True:
            failure, cut_short = None, None
            try:
                return self._train_step(rows_index, attempt)
            except _StepAborted as aborted:
                failure, cut_short = "aborted", (str(aborted) or None)
            except _OomAgreed as agreed:
                failure = str(agreed)
            except _ShardedOom as oom:
                raise OutOfMemoryError(
                    f"out of memory on rank {self.ranks.rank} at step {self.step + 1} with micro-batch "
                    f"{self.micro_batch} under --distributed {self.config.distributed} ({oom}): not recoverable in "
                    "the process (the other ranks may wait in a collective), the launcher ends them",
                    hint=f"resume from the last checkpoint with a smaller --batch-size (torchrun --max-restarts "
                         f"restarts by itself); last: {self.last_checkpoint or 'none yet'}") from None
            except Exception as error:  # noqa: BLE001 - only out-of-memory errors are handled, the rest re-raised
                if not is_out_of_memory(error):
                    raise
                failure = " ".join(str(error).split())[:200]
            # Outside the except block: the traceback (and the activations its frames hold) is gone by now.
            self.optimizer.zero_grad(set_to_none=True)
            release_memory()
            self._set_torch_rng_state(rng)
            if failure == "aborted":
                if cut_short:
                    self.emit(Notice(f"{cut_short}: {self.guard.stop_reason or 'stop requested'}; the step is "
                                     "dropped (the checkpoint holds the one before)", "warning"))
                return "aborted"
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

    def _torch_rng_state(self) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        cuda = (torch.cuda.get_rng_state_all() if self.device == "cuda" and torch.cuda.is_initialized() else None)
        return torch.get_rng_state(), cuda

    @staticmethod
    def _set_torch_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
        cpu, cuda = state
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

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
        engine_files = self._gather_engine_state()  # sharded engines: collectives on every rank
        if not self.ranks.is_main:
            self.last_checkpoint = self.job.output_dir / ckpt.CHECKPOINTS / f"step-{self.step}"
            return self.last_checkpoint
        state = {"step": self.step, "samples_seen": self.samples_seen, "micro_batch": self.micro_batch,
                 "grad_accum": math.ceil(self.effective_batch / self.micro_batch),
                 "effective_batch": self.effective_batch, "oom_recoveries": self.recoveries,
                 "recent_losses": self.recent_losses[-50:], "total_steps": self.total_steps,
                 "world_size": self.ranks.world_size, "global_batch": self.global_batch}
        meta = {"reason": reason, "config": self.config.model_dump(), "model": self.model_spec,
                "model_path": str(self.resolved.path), "data": str(Path(self.job.data).resolve()),
                "data_sha256": self.data_sha256,
                "val_data": str(Path(self.job.val_data).resolve()) if self.job.val_data else None,
                "output_dir": str(Path(self.job.output_dir).resolve()), "versions": versions(),
                "world_size": self.ranks.world_size}
        try:
            path = ckpt.save_checkpoint(self.job.output_dir, self.step,
                                        model=self.accelerator.unwrap_model(self.model), optimizer=self.optimizer,
                                        scheduler=self.scheduler, trainer_state=state, meta=meta,
                                        keep=self.config.keep_checkpoints, rank_rng_states=rank_rng,
                                        **engine_files)
        except DiskFullError:
            self._ended_on_disk_full()
            raise
        self.last_checkpoint = path
        self.emit(CheckpointSaved(self.step, path, reason, time.perf_counter() - started))
        return path

    def _gather_engine_state(self) -> dict[str, Any]:
        """A sharded engine's part of a checkpoint, as `ckpt.save_checkpoint` keyword arguments (meaningful on rank
        0). Every rank calls it at the same point: it holds collectives. {} for one process and DDP."""
        if self.fsdp:
            from memfit.distributed.fsdp import gather_optimizer, gather_trainable

            return {"tensors": gather_trainable(self.fsdp_model),
                    "optimizer_state": gather_optimizer(self.fsdp_model, self.optimizer)}
        if not self.deepspeed:
            return {}
        # Each rank writes its partition (DeepSpeed's engine checkpoint, through accelerate); rank 0 moves the
        # directory into the checkpoint once all have, so the checksums cover every rank's files. The output dir
        # must be on a filesystem every node sees (as DeepSpeed's own checkpoints need).
        engine_dir = self.job.output_dir / ckpt.CHECKPOINTS / f"{ckpt.TMP_PREFIX}deepspeed-step-{self.step}"
        self.accelerator.save_state(str(engine_dir))
        tensors = self._deepspeed_trainable()
        self.agreement.barrier()
        return {"tensors": tensors, "optimizer_state": {}, "engine_dir": engine_dir}

    def _deepspeed_trainable(self) -> dict[str, torch.Tensor]:
        """The trainable tensors (the engine's 16-bit ones) on rank 0's CPU; a collective under ZeRO-3. Under
        ZeRO-1/2 every rank holds them whole; ZeRO-3 gathers the adapters alone (GatheredParameters), and a full
        fine-tune through accelerate's consolidated 16-bit state dict, layer by layer to rank 0."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        named = [(name, param) for name, param in unwrapped.named_parameters() if param.requires_grad]
        main = self.ranks.is_main
        if self.config.distributed != "zero3":
            return {name: param.detach().cpu().contiguous() for name, param in named} if main else {}
        if not self.config.uses_adapters:
            wanted = {name for name, _ in named}
            full = self.accelerator.get_state_dict(self.model) or {}
            return {name: tensor.detach().cpu().contiguous() for name, tensor in full.items() if name in wanted}
        import deepspeed

        with deepspeed.zero.GatheredParameters([param for _, param in named], modifier_rank=None):
            return {name: param.detach().cpu().clone() for name, param in named} if main else {}

    def _gather_final_state(self) -> dict[str, torch.Tensor] | None:
        """The state dict final/ is written from, whole on rank 0: the adapters (PEFT keeps its own keys out of
        it) or, for a full fine-tune, the model. A collective on every rank."""
        if self.deepspeed:
            if self.config.uses_adapters:
                return self._deepspeed_trainable()
            # ZeRO-1/2 hold the whole 16-bit model on every rank: save_pretrained reads it as it is.
            return self.accelerator.get_state_dict(self.model) if self.config.distributed == "zero3" else None
        from memfit.distributed.fsdp import gather_model, gather_trainable

        return gather_trainable(self.fsdp_model) if self.config.uses_adapters else gather_model(self.fsdp_model)

    def _ended_on_disk_full(self) -> None:
        self.guard.stop()
        self._write_run_json(status="disk_full", exit_code=DiskFullError.exit_code, step=self.step,
                             finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                             checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None)

    def save_final(self) -> Path:
        import os
        import shutil

        final = self.job.output_dir / FINAL
        gathered = self._gather_final_state() if self.sharded else None  # every rank takes part
        if not self.ranks.is_main:
            return final  # rank 0 writes it
        partial = self.job.output_dir / f".{FINAL}.tmp-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            extra = {} if gathered is None else {"state_dict": gathered}
            self.accelerator.unwrap_model(self.model).save_pretrained(str(partial), safe_serialization=True,
                                                                      **extra)
            self.tokenizer.save_pretrained(str(partial))
        except Exception as error:
            shutil.rmtree(partial, ignore_errors=True)
            full = ckpt.disk_full_reason(error, self.job.output_dir)
            if not full:
                raise
            self._ended_on_disk_full()
            raise DiskFullError(f"could not write {final}: {full}",
                                hint=f"free space on that disk, then `memfit train --resume {self.last_checkpoint}` "
                                     "writes it (the training is done and checkpointed)") from None
        if final.exists():
            old = self.job.output_dir / f".{FINAL}.old-{os.getpid()}"
            os.rename(final, old)
            os.rename(partial, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(partial, final)
        return final

    @torch.no_grad()
    def evaluate(self) -> None:
        from memfit.data import collate
        from memfit.train.losses import IGNORE_INDEX, micro_step_loss, scored_tokens

        rows = self.val_dataset.rows
        batches = None
        if self.distributed:  # each rank its share; the sums are added up below
            all_rows = len(rows)
            rows = rows[self.ranks.rank::self.ranks.world_size]
            if self.sharded:  # forward passes hold collectives: every rank runs as many (the longest share's)
                batches = math.ceil(math.ceil(all_rows / self.ranks.world_size) / self.micro_batch)
        self.model.eval()
        loss_sum = torch.zeros((), device=self.accelerator.device)
        count = 0
        starts = list(range(0, len(rows), self.micro_batch))
        if batches is not None:
            starts += [None] * (batches - len(starts))  # a filler forward on one row, its loss not counted
        for start in starts:
            chunk = rows[:1] if start is None else rows[start:start + self.micro_batch]
            batch = collate(chunk or self.val_dataset.rows[:1], self.val_dataset.samples, self.pad_id)
            counted = start is not None
            scored = scored_tokens(batch.labels, (batch.labels != IGNORE_INDEX).float() * counted)
            loss_sum += micro_step_loss(self.model, self._model_inputs(batch),
                                        scored.to(self.accelerator.device), head=self.head,
                                        compute_dtype=self.precision.compute_dtype)
            count += len(scored.index) if counted else 0
        self.model.train()
        if self.distributed:
            totals = torch.stack([loss_sum, torch.tensor(float(count), device=loss_sum.device)])
            all_reduce_sum([totals])
            loss_sum, count = totals[0], int(totals[1])
        val_loss = float(loss_sum) / max(count, 1)
        self.emit(EvalEnd(self.step, val_loss, math.exp(min(val_loss, 50.0)), count))

    def memory_report_text(self, sample) -> str:
        from memfit.guard import memory_report

        return memory_report(sample, self.limit, self.config.memory_threshold, self.guard.peak_watched_bytes)

    # --- the loop ----------------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        config = self.config
        unwrapped = self.accelerator.unwrap_model(self.model)
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in unwrapped.parameters() if p.requires_grad)
        total = sum(getattr(p, "ds_numel", p.numel()) for p in unwrapped.parameters())
        self.emit(RunStarted(self.job.output_dir, self.step, self.total_steps, self.resolved.name, self.device,
                             self.precision.name, trainable, total, self.limit.limit_bytes, self.estimate))
        self.last_checkpoint = None
        sample, events = self.guard.end_step(self.step)  # the model alone may already be over the limit
        self._emit_guard(events)
        status = "done"
        while self.step < self.total_steps and not self._stop_agreed():
            rows_index = self._rows_for_step()
            started = time.perf_counter()
            outcome = self._run_step_with_recovery(rows_index)
            if outcome == "oom":
                status = "oom"
                break
            if outcome == "aborted":
                break
            self.step += 1
            self.samples_seen += self.global_batch
            self.allocator.step_end()  # part of the step's time: it is what RSS following live tensors costs
            elapsed = time.perf_counter() - started
            self.guard.note_step_time(elapsed)
            sample, events = self.guard.end_step(self.step)
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
        # Several processes: what they agreed, so every rank ends the same way.
        interrupted = self.decision.interrupted_rank is not None if self.distributed else self.interrupted
        guard_stop = self.decision.stop_rank is not None if self.distributed else self.guard.stop_requested
        if status not in ("oom", "reload") and interrupted:
            status = "interrupted"
        elif status not in ("oom", "reload") and guard_stop:
            status = "guard_stop"
        return self._finish(status)

    def _rows_for_step(self) -> list[int]:
        """The step's rows, all ranks' (every rank knows every row of the step; it trains its share)."""
        rows = self.row_order.rows(self.samples_seen, self.global_batch)
        longest = self._row_length(self.longest_row)
        if self.job.trial and self.step == self.total_steps - 1 and max(map(self._row_length, rows)) < longest:
            rows[-1] = self.longest_row
        return rows

    def _row_length(self, row: int) -> int:
        return len(self.dataset.rows[row].input_ids)

    def _step_done(self, stats: dict[str, Any], elapsed: float, sample) -> None:
        """Hold the step until its loss is read back (`_flush_steps`): every step on CPU, about every
        LOG_INTERVAL_S elsewhere, or every --log-every steps."""
        self.step_times = (self.step_times + [elapsed])[-20:]
        self.pending_steps.append({**stats, "step": self.step, "elapsed": elapsed, "sample": sample,
                                   "lr": self.scheduler.get_last_lr()[0], "micro_batch": self.micro_batch})
        every = self.config.log_every
        due = (self.step % every == 0 if every else
               self.device == "cpu" or time.perf_counter() - self.last_flush >= LOG_INTERVAL_S)
        if due or self.step >= self.total_steps:
            self._flush_steps()

    def _flush_steps(self) -> None:
        """Read the held steps' losses back in one host sync and emit their StepEnd events, in order."""
        if not self.pending_steps:
            return
        pending, self.pending_steps = self.pending_steps, []
        self.last_flush = time.perf_counter()
        nan = torch.full((), float("nan"), device=pending[0]["loss_sum"].device)
        values = torch.stack([torch.stack([held["loss_sum"].float(),
                                           (held["grad_norm"] if held["grad_norm"] is not None else nan).float()])
                              for held in pending]).tolist()  # the one read-back
        # The first step of a process pays for warm-up; leave it out of the rate once there are others.
        times = self.step_times[1:] if len(self.step_times) > 1 else self.step_times
        steps_per_s = len(times) / max(sum(times), 1e-9)
        for held, (ce, grad_norm) in zip(pending, values):
            loss = ce
            if self.config.loss == "distrust" and self.config.distrust_mode == "add":
                loss += held["distrust_term"]
            self.recent_losses = (self.recent_losses + [loss])[-50:]
            window = self.recent_losses[-20:]
            sample, elapsed = held["sample"], held["elapsed"]
            memory = {key: value for key, value in vars(sample).items() if key != "time" and value is not None}
            self.emit(StepEnd(
                step=held["step"], total_steps=self.total_steps, loss=loss, avg_loss=sum(window) / len(window),
                ce=ce, lr=held["lr"], grad_norm=None if math.isnan(grad_norm) else grad_norm,
                tokens=held["tokens"], step_time_s=elapsed, tokens_per_s=held["tokens"] / max(elapsed, 1e-9),
                steps_per_s=steps_per_s, eta_s=(self.total_steps - held["step"]) / steps_per_s,
                micro_batch=held["micro_batch"], grad_accum=held["micro_batches"],
                watched_bytes=sample.window_peak_bytes or sample.watched_bytes, memory=memory,
                distrust_term=held["distrust_term"]))

    def _emit_guard(self, events) -> None:
        for event in events:
            self.emit(GuardNotice(event.kind, event.step, event.watched_bytes, event.message))

    def _finish(self, status: str) -> TrainResult:
        from memfit.guard import read_memory

        self._flush_steps()
        final_dir = None
        if self.job.trial:
            pass  # a trial measures memory and keeps nothing
        elif status == "done":
            if self.val_dataset and not (self.config.eval_every and self.step % self.config.eval_every == 0):
                self.evaluate()
            self.save("end")
            final_dir = self.save_final()
        else:
            self.save({"guard_stop": "memory limit", "oom": "out of memory", "interrupted": "interrupted",
                       "reload": "reload"}[status])
        self.guard.stop()
        ending = read_memory(self.device)
        report = self.memory_report_text(ending)
        exit_code = {"done": EXIT_OK, "guard_stop": EXIT_GUARD_STOP, "oom": EXIT_OOM,
                     "interrupted": EXIT_INTERRUPTED, "reload": EXIT_RELOAD}[status]
        resume = (None if status in ("done", "reload") or self.job.trial
                  else f"memfit train --resume {self.last_checkpoint}{self._resume_flags(status)}")
        stop_reason, signal_name = self.guard.stop_reason, self.interrupted
        per_rank = None
        if self.distributed:
            # Every rank's peaks for run.json, and the reason of the rank that asked to stop (rank 0 tells it).
            per_rank = self.agreement.gather({
                "rank": self.ranks.rank, "peak_watched_bytes": self.guard.peak_watched_bytes,
                "peak_rss_bytes": ending.peak_rss_bytes, "limit_bytes": self.limit.limit_bytes,
                "stop_reason": self.guard.stop_reason, "interrupted": self.interrupted})
            if self.decision.stop_rank is not None:
                stop_reason = f"rank {self.decision.stop_rank}: {per_rank[self.decision.stop_rank]['stop_reason']}"
            if self.decision.interrupted_rank is not None:
                signal_name = (f"{per_rank[self.decision.interrupted_rank]['interrupted']} on rank "
                               f"{self.decision.interrupted_rank}")
        message = {
            "done": f"finished {self.step} steps",
            "guard_stop": f"stopped by the memory guard at step {self.step}: {stop_reason}",
            "oom": f"out of memory at step {self.step + 1} with micro-batch {self.micro_batch}",
            "interrupted": f"interrupted ({signal_name}) at step {self.step}",
            "reload": f"reloading at step {self.step} (--reload-interval {self.job.reload_after})",
        }[status]
        extra = {"ranks": per_rank, "estimate_per_rank_bytes": self.estimate} if per_rank else {}
        self._write_run_json(status=status, exit_code=exit_code, step=self.step,
                             finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                             checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
                             final_dir=str(final_dir) if final_dir else None,
                             # The OS's high-water mark (VmHWM): the true peak, between the guard's readings too.
                             peak_rss_bytes=ending.peak_rss_bytes, **extra)
        ended = RunEnded(status, exit_code, self.step, self.total_steps, message, self.last_checkpoint, final_dir,
                         resume, report, self.recoveries)
        self.emit(ended)  # rank 0's entry point writes the run report as this reaches it (memfit.report.report_at_end)
        # No rank returns (and exits) before rank 0's files are written: the launcher stops the other workers as
        # soon as one exits with a non-zero code.
        self.agreement.barrier()
        return ended


def train(job: TrainJob, config: TrainConfig, on_event: Callable[[Event], None] | None = None) -> TrainResult:
    """Train as `config` says; returns how it ended (exit code included). SIGINT/SIGTERM stop it at the next safe
    point with a checkpoint; a second signal aborts at once (KeyboardInterrupt, after one line saying so: the step
    in flight and any checkpoint being written are dropped, the last complete checkpoint stays resumable)."""
    import os

    trainer = Trainer(job, config, on_event)
    first_signal_at = [0.0]
    # A supervised trainer (memfit.train.supervisor) asked for SIGTERM when its supervisor dies (PR_SET_PDEATHSIG).
    # The kernel sends it again at each reparenting (to another thread of the dying supervisor, then to init): once
    # the supervisor is gone, a repeated SIGTERM is that, not a user's second signal, and must not abort the stop.
    supervisor = os.getppid() if job.attempt is not None else None

    def on_signal(signum, frame):
        if trainer.interrupted:
            if trainer.distributed and time.monotonic() - first_signal_at[0] < REPEATED_SIGNAL_S:
                return  # the launcher passing on the Ctrl-C this worker already got from the terminal
            if supervisor is not None and os.getppid() != supervisor:
                return  # the parent-death signal again (see above)
            raise KeyboardInterrupt
        trainer.interrupted = signal.Signals(signum).name
        first_signal_at[0] = time.monotonic()

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {}
    if in_main_thread:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, on_signal)
    finished = False
    try:
        trainer.setup()
        result = trainer.run()
        finished = True
        return result
    except KeyboardInterrupt:
        if trainer.interrupted:
            _say_aborted(trainer)
        raise
    finally:
        trainer.restore_head()
        guard = getattr(trainer, "guard", None)
        if guard is not None:
            guard.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if finished and trainer.distributed:
            leave_process_group()


def _say_aborted(trainer: Trainer) -> None:
    """The second signal's abort, in one line and in run.json: nothing else is written on the way out."""
    try:
        trainer.emit(Notice(f"aborted by a second {trainer.interrupted}: the step in flight and any checkpoint "
                            "being written are dropped; resume from the newest complete checkpoint with "
                            f"`memfit train --resume {trainer.job.output_dir}`", "warning"))
        if hasattr(trainer, "start_step"):  # run.json written (set-up finished): say how it ended there too
            trainer._write_run_json(status="aborted", exit_code=EXIT_INTERRUPTED, step=trainer.step,
                                    finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    except Exception:  # noqa: BLE001 - saying so must not hide the abort itself
        pass
