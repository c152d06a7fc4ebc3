"""The pieces of a training run that `Trainer.setup` puts together, in its order: the output directory and resume
checks, the data, the guard, the model, and the choices the model allows (chunked loss, packing, layer hooks)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from memfit import faults
from memfit.allocator import DEFAULT_POLICY as DEFAULT_ALLOCATOR_POLICY
from memfit.config import TrainConfig
from memfit.errors import OutOfMemoryError
from memfit.train import checkpoint as ckpt
from memfit.events import Notice
from memfit.train.rundir import RunDir, check_fresh_output_dir

Emit = Callable[[Any], None]


def check_output_dir(job, config: TrainConfig, ranks, per_rank_checkpoint: bool) -> None:
    """A new run never writes over another; a resume continues its checkpoint exactly (memfit.train.checkpoint)."""
    if job.resume is None and job.fresh_restart:
        RunDir(job.output_dir).truncate_metrics_after(0)  # the dead life's steps are trained again
    elif job.resume is None:
        if ranks.is_main:  # rank 0 writes run.json soon: another rank checking after that would see a run there
            check_fresh_output_dir(job.output_dir)
    else:
        ckpt.check_resume(job.resume, config, ranks.world_size, per_rank_checkpoint, job.force)


@dataclass
class TrainData:
    """The tokenized training (and validation) rows and the order the steps take them in."""

    tokenizer: Any
    pad_id: int
    dataset: Any
    val_dataset: Any
    data_sha256: str
    row_order: Any  # memfit.data.RowOrder
    longest_row: int

    def row_length(self, row: int) -> int:
        return len(self.dataset.rows[row].input_ids)

    def rows_for_step(self, samples_seen: int, global_batch: int, with_longest: bool) -> list[int]:
        """The step's rows, all ranks' (every rank knows every row of the step; it trains its share).
        `with_longest`: a probe trial's last step holds a row of the longest length (memfit.train.job.TrainJob)."""
        rows = self.row_order.rows(samples_seen, global_batch)
        if with_longest and max(map(self.row_length, rows)) < self.row_length(self.longest_row):
            rows[-1] = self.longest_row
        return rows


def load_data(job, config: TrainConfig, model_dir: Path, global_batch: int, emit: Emit) -> TrainData:
    """Every data line read and tokenized (bad input fails here, before the model loads)."""
    from transformers import AutoTokenizer

    from memfit.data import RowOrder, build_dataset, pad_token_id

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    distrust = config.loss == "distrust"
    dataset = build_dataset(job.data, tokenizer, config.seq_len, config.packing, distrust)
    val_dataset = (build_dataset(job.val_data, tokenizer, config.seq_len, config.packing, distrust)
                   if job.val_data else None)
    data_sha256 = ckpt.sha256_file(Path(job.data))
    if job.resume is not None:
        ckpt.check_resume_data(job.resume, job.data, data_sha256, job.force)
    emit(Notice(f"data: {dataset.stats.summary()}"))
    if val_dataset:
        emit(Notice(f"validation: {val_dataset.stats.summary()}"))
    lengths = [len(row.input_ids) for row in dataset.rows]
    # Packed blocks are nearly all seq-len long: grouping them would only reorder; the seeded order is kept.
    grouped = config.group_by_length and not dataset.stats.packed
    return TrainData(tokenizer, pad_token_id(tokenizer), dataset, val_dataset, data_sha256,
                     RowOrder(lengths, config.seed, global_batch, grouped),
                     max(range(len(lengths)), key=lengths.__getitem__))


def total_steps(config: TrainConfig, rows: int, global_batch: int) -> int:
    return config.max_steps or max(1, math.ceil(config.epochs * rows / global_batch))


def _fake_gpu_reader(held_bytes: int):
    """The real reading with the CUDA fields filled in: the GPU side fake, RSS and available memory real."""
    from dataclasses import replace

    from memfit.guard import read_memory

    def read(device: str):
        return replace(read_memory("cpu"), cuda_allocated_bytes=held_bytes, cuda_reserved_bytes=held_bytes,
                       cuda_max_reserved_bytes=held_bytes)

    return read


def start_guard(config: TrainConfig, device: str, ranks, allocator, emit: Emit):
    """The memory limit and the guard that watches it, started (loading the model is watched already). On a GPU the
    guard watches host RAM too (memfit.guard.policy: HostLimit), with its own limit."""
    from memfit.guard import Guard, choose_host_limit, choose_limit, configure_cuda, read_memory, watches_host

    reader = read_memory
    fake_gpu = faults.fake_gpu_bytes()
    if fake_gpu is not None:  # a CPU run guarded as on a GPU (tests: memfit.faults `fake_gpu@MB`)
        device, reader = "cuda", _fake_gpu_reader(fake_gpu)
    fraction = host_fraction = 0.8
    if ranks.distributed:
        # The ranks of a machine share its RAM: each takes its part of the auto limit (of the host limit on a GPU).
        host_fraction /= ranks.local_world_size
        if device == "cuda":
            device = f"cuda:{ranks.local_rank}"
        else:
            fraction = host_fraction
    limit = choose_limit(config.max_memory, device, fraction)
    emit(Notice(limit.describe() + (f"; per rank ({ranks.world_size} ranks, each guards its own memory)"
                                    if ranks.distributed else "")))
    host = choose_host_limit(config.max_host_memory, host_fraction) if watches_host(device) else None
    if host is not None:
        emit(Notice(host.describe()))
    elif config.max_host_memory is not None:
        emit(Notice(f"--max-host-memory applies on a GPU only; on {device} --max-memory limits the process's RAM",
                    "warning"))
    # MEMFIT_MALLOC took effect, or the policy could not (off glibc it does nothing: said once, here).
    if allocator.policy != DEFAULT_ALLOCATOR_POLICY or not allocator.effective:
        emit(Notice(allocator.describe()))
    if fake_gpu is None and device.startswith("cuda"):
        measure_cuda_context(device, ranks.distributed, emit)
    configure_cuda(limit)
    guard = Guard(limit, threshold=config.memory_threshold, interval_s=config.memory_sample_interval,
                  reader=reader, host=host)
    guard.start()
    return limit, guard


def measure_cuda_context(device: str, distributed: bool, emit: Emit) -> None:
    """The CUDA context measured with NVML as CUDA starts (memfit.cuda_context), recorded for this machine's
    estimates; nothing without the `nvidia` extra or a driver."""
    import torch

    from memfit.cuda_context import measure_and_record
    from memfit.units import format_gb

    if not torch.cuda.is_available():
        return
    _, _, index = device.partition(":")
    measurement = measure_and_record(int(index) if index else 0,
                                     delta_ok=not distributed and not torch.cuda.is_initialized())
    if measurement is not None:
        emit(Notice(f"CUDA context: {format_gb(measurement.context_bytes)} measured with NVML on "
                    f"{measurement.gpu_name} (used by this machine's estimates from now on)"))


def load_model(job, config: TrainConfig, precision, device: str, model_dir: Path, emit: Emit):
    """The model to train (memfit.train.model); out of memory while loading is one line (exit 4)."""
    from memfit.guard import is_out_of_memory
    from memfit.train import model as models

    failure = None
    try:
        return models.load_model(model_dir, config, precision, device, notify=lambda line: emit(Notice(line)))
    except Exception as error:  # noqa: BLE001 - only out-of-memory is turned into a message
        if not is_out_of_memory(error):
            raise
        failure = " ".join(str(error).split())[:200]
    raise OutOfMemoryError(f"out of memory while loading {job.model} on {device}: {failure}",
                           hint="see `memfit estimate` for the weights' size; --method qlora or a smaller model")


def step_path(model, config: TrainConfig, engine_blocker: str | None, packed: bool, emit: Emit):
    """The chunked loss and leak-free packing, where this model allows them (a notice says when not): (the head
    bypass to leave at the run's end or None, the head the loss goes through by chunks or None, whether packed
    samples are kept apart by position ids)."""
    from memfit.models.attention import packing_isolated
    from memfit.train.chunked_loss import chunked_loss_blocker, head_returns_hidden

    bypass, head = None, None
    if config.chunked_loss:
        blocker = engine_blocker or chunked_loss_blocker(model)
        if blocker:
            emit(Notice(f"chunked loss off: {blocker}; computing full logits", "warning"))
        else:
            # For the whole run: the model returns hidden states and the loss goes through the head by chunks.
            bypass = head_returns_hidden(model)
            head = bypass.__enter__()
    position_packing = packing_isolated(model)
    if packed and not position_packing:
        emit(Notice(f"{model.config.model_type}: packed samples can attend to each other in this architecture "
                    "(no position-id isolation); use --no-packing to avoid it", "warning"))
    return bypass, head, position_packing


def install_layer_hooks(model, running, stop_hook: Callable[[int, int], Callable] | None) -> int:
    """The fault hooks (memfit.faults) on the decoder layers, and `stop_hook(index, layers)`, the guard's stop at
    each layer's entry, where given. Returns how many decoder layers there are. `running()`: the training
    micro-batch in flight, (step, attempt, micro-batch), or None."""
    from memfit.models.arch import decoder_layers

    layers = decoder_layers(model)
    if layers and faults.layer_faults_active():
        faults.install_layer_faults(layers, running)
    if stop_hook is not None:
        for index, layer in enumerate(layers):
            layer.register_forward_pre_hook(stop_hook(index, len(layers)))
    return len(layers)
