"""The memory breakdown of one training configuration, per device, and the largest batch that fits.

Components (bytes per device):
- weights: every parameter at the dtype it is stored in (trained params at the trainable dtype; a frozen LoRA base
  at the compute dtype; a 4-bit base at 0.5 byte/weight plus nf4 block constants, with the embeddings, norms and
  lm_head that `prepare_model_for_kbit_training` casts to fp32);
- adapters: LoRA A/B matrices (fp32 under mixed precision, as PEFT keeps them);
- gradients: one per trained parameter, in its dtype;
- optimizer: states by optimizer and dtype (AdamW m+v, 8-bit blockwise states, Adafactor's factored moments),
  plus the fp32 master copy where the engine keeps one apart from the weights (DeepSpeed ZeRO);
- activations, logits: the peak of one traced micro-step (memfit.estimate.trace), on 2- and 4-layer cuts of the
  real architecture extrapolated per decoder layer;
- runtime: the process baseline on CPU, the CUDA context and allocator slack on CUDA.

Components are attributed at the moment of the peak: gradients count in full, and activations+logits count what
the step holds above them at its highest point.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from memfit.config import TrainConfig
from memfit.errors import UserError
from memfit.estimate.arch import ArchInfo, arch_info, build_meta_model, decoder_layers
from memfit.estimate.trace import TracePeak, fakeify_, trace_step
from memfit.precision import Precision, resolve_precision

GB = 1024**3
MB = 1024**2

# CPU runtime = a process's anonymous baseline + its file-backed pages (libraries), measured on Linux x86_64, torch
# 2.13 CPU, transformers 5.23 (docs/benchmarks.md). Anonymous: Python, torch, transformers and the model code
# imported and one step run, before any model memory. PEFT's import (and the bitsandbytes it loads) adds to it.
CPU_PROCESS_ANON_BYTES = 244 * MB
CPU_PEFT_IMPORT_BYTES = 82 * MB
# File-backed pages vary with the page cache (more right after an install), so they are read from this process,
# which maps the same libraries; a training process touches more of them: 1.33x (measured in a fresh and an aged
# venv: this process 97 vs 145 MB, the training child +64 MB). Where /proc is absent, the aged-venv reading.
CPU_FILE_PAGES_RATIO = 1.33
CPU_FILE_PAGES_FALLBACK_BYTES = 97 * MB
# CUDA context with cuBLAS/cuDNN handles and workspaces (published figures for recent drivers: 0.3-0.6 GB).
CUDA_CONTEXT_BYTES = 512 * MB
MPS_RUNTIME_BYTES = 256 * MB
# The caching allocator rounds and fragments: reserved exceeds allocated by a few percent of what churns.
CUDA_ALLOCATOR_SLACK = 0.05
# DeepSpeed ZeRO-3 keeps the layer being computed and the prefetched next one gathered.
ZERO3_GATHERED_LAYERS = 2
TRACE_LAYERS = (2, 4)


@dataclass(frozen=True)
class Hardware:
    device: str = "cpu"  # cpu | cuda | mps
    memory_bytes: int = 0  # per device
    num_gpus: int = 1
    zero: int = 0
    offload: str = "none"  # none | cpu
    # Who shards at zero >= 1: DeepSpeed, or FSDP (FULL_SHARD only: it counts as zero 3). FSDP's mixed precision
    # keeps the trained parameters fp32 (the master copy is the parameter), DeepSpeed 16-bit with an fp32 copy in
    # the optimizer: the same bytes per parameter, in other components (2 + 2 + 4 + states = 4 + 4 + states).
    engine: str = "deepspeed"  # deepspeed | fsdp


@dataclass
class Estimate:
    model: str
    config: TrainConfig
    hardware: Hardware
    precision: str
    params: int
    trainable_params: int
    breakdown: dict[str, int]
    host_offload_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    # The process's peak while loading the checkpoint (CPU only), when that is above the training step's: see
    # `load_peak_bytes`. 0 when loading stays below training, as it does whenever no dtype conversion happens.
    load_peak_bytes: int = 0

    @property
    def training_bytes(self) -> int:
        return sum(self.breakdown.values())

    @property
    def total_bytes(self) -> int:
        return max(self.training_bytes, self.load_peak_bytes)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.hardware.memory_bytes


# --- static terms -------------------------------------------------------------------------------------------------


def _nf4_bytes(weights: int) -> float:
    # 4 bits per weight; one absmax per 64-weight block, itself 8-bit quantized with an fp32 constant per 256 blocks.
    return weights * 0.5 + weights / 64 + weights / (64 * 256) * 4


def _int8_bytes(weights: int, rows: int) -> float:
    return weights + rows * 4  # LLM.int8: one byte per weight and an fp32 scale per output row


def weight_bytes(info: ArchInfo, config: TrainConfig, precision: Precision) -> int:
    if config.method == "full":
        return info.params * precision.trainable_bytes
    if config.quant == "none":
        return info.params * precision.frozen_bytes
    rows = sum(linear.out_features for linear in info.linears)
    quantized = _nf4_bytes(info.linear_weight_params) if config.quant == "4" else _int8_bytes(
        info.linear_weight_params, rows)
    # prepare_model_for_kbit_training casts everything that is not quantized (embeddings, norms, head) to fp32.
    return int(quantized + (info.params - info.linear_weight_params) * 4)


def trainable_shapes(info: ArchInfo, config: TrainConfig) -> list[tuple[int, ...]]:
    if config.method == "full":
        return list(info.param_shapes)
    shapes: list[tuple[int, ...]] = []
    for linear in info.lora_targets(config.lora_targets, config.lora_layers):
        shapes += [(config.lora_rank, linear.in_features), (linear.out_features, config.lora_rank)]
    return shapes


def optimizer_state_bytes(name: str, shapes: list[tuple[int, ...]], state_bytes: int) -> int:
    """Bytes of optimizer state for parameters of these shapes, states kept at `state_bytes` per element."""
    total = 0
    for shape in shapes:
        numel = math.prod(shape)
        if name == "adamw":
            total += 2 * numel * state_bytes
        elif name == "adamw8bit":
            # bitsandbytes keeps tensors under 4096 elements in 32-bit; others blockwise 8-bit (absmax per 256).
            total += 2 * numel * 4 if numel < 4096 else 2 * (numel + math.ceil(numel / 256) * 4)
        elif name == "adafactor":
            # Factored second moment for matrices (row and column sums), full for vectors; no first moment.
            if len(shape) >= 2:
                total += (numel // shape[-1] + numel // shape[-2]) * state_bytes
            else:
                total += numel * state_bytes
        elif name == "sgd":
            total += 0
    return total


# --- dynamic terms: traced --------------------------------------------------------------------------------------


_TRACE_CACHE: dict[tuple, dict[str, TracePeak]] = {}


def _cut_config(hf_config, num_layers: int):
    cut = copy.deepcopy(hf_config)
    text = cut.get_text_config() if hasattr(cut, "get_text_config") else cut
    for name in ("num_hidden_layers", "n_layer"):
        if hasattr(text, name):
            setattr(text, name, num_layers)
    for name in ("layer_types",):  # per-layer lists (gemma-2 sliding/global) must match the new depth
        value = getattr(text, name, None)
        if isinstance(value, list) and value:
            setattr(text, name, [value[i % len(value)] for i in range(num_layers)])
    return cut


def _trace_cut(hf_config, config: TrainConfig, precision: Precision, num_layers: int,
               batch_size: int) -> dict[str, TracePeak]:
    key = (hf_config.to_json_string(use_diff=False), config.model_dump_json(), precision.name, num_layers, batch_size)
    if key not in _TRACE_CACHE:
        # Building the cut (weight init, LoRA init) draws from the global RNG, and only on a cache miss: keep it
        # off the caller's stream, or a training run's dropout masks would depend on what was estimated before.
        with torch.random.fork_rng(devices=[]):
            _TRACE_CACHE[key] = _trace_cut_uncached(hf_config, config, precision, num_layers, batch_size)
    return _TRACE_CACHE[key]


def _trace_cut_uncached(hf_config, config: TrainConfig, precision: Precision, num_layers: int,
                        batch_size: int) -> dict[str, TracePeak]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    cut = _cut_config(hf_config, num_layers)
    cut.use_cache = False
    from memfit.train.model import attn_implementation

    model = build_meta_model(cut, attn_implementation=attn_implementation(config))
    if config.method == "full":
        model.to(precision.trainable_dtype)
    else:
        model.to(precision.frozen_dtype)
        if config.quant != "none":
            # Emulate a k-bit base: matmuls dequantize to the compute dtype; the rest is fp32 after
            # prepare_model_for_kbit_training.
            for name, param in model.named_parameters():
                if param.dim() < 2 or "embed" in name or "lm_head" in name or "wte" in name or "wpe" in name:
                    param.data = param.data.to(torch.float32)
    for param in model.parameters():
        param.requires_grad_(config.method == "full")
    head = model.get_output_embeddings()
    last_layer = decoder_layers(model)[-1]
    if config.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.uses_adapters:
            model.enable_input_require_grads()
    if config.uses_adapters:
        from memfit.train.model import apply_lora

        adapted = config.model_copy(update={"lora_layers": None})
        model = apply_lora(model, adapted, precision)
    model.train()
    fake_mode = FakeTensorMode()
    fakeify_(model, fake_mode)
    text = cut.get_text_config() if hasattr(cut, "get_text_config") else cut
    from memfit.train.chunked_loss import chunked_loss_blocker

    chunked = config.chunked_loss and chunked_loss_blocker(model) is None
    return trace_step(model, fake_mode, batch_size, config.seq_len, text.vocab_size, precision.compute_dtype,
                      precision.autocast, head=head, last_layer=last_layer, chunked_loss=chunked)


def traced_peaks(hf_config, info: ArchInfo, config: TrainConfig, precision: Precision,
                 batch_size: int) -> dict[str, TracePeak]:
    """Peak of one micro-step for the whole depth, from traces of 2- and 4-layer cuts.

    Decoder layers are identical (or alternate with period 2), so the saved activations grow by the same amount
    per layer; only layers that train (or lie after one that trains) hold activations for backward.
    """
    short, long = TRACE_LAYERS
    trained_layers = info.num_layers
    if config.uses_adapters and config.lora_layers:
        trained_layers = min(config.lora_layers, info.num_layers)
    if info.num_layers <= long:
        return _trace_cut(hf_config, config, precision, info.num_layers, batch_size)
    low = _trace_cut(hf_config, config, precision, short, batch_size)
    high = _trace_cut(hf_config, config, precision, long, batch_size)
    extra = (trained_layers - short) / (long - short)

    def grow(a: int, b: int) -> int:
        return max(0, int(a + (b - a) * extra))

    return {
        phase: TracePeak(
            activations=grow(low[phase].activations, high[phase].activations),
            logits=grow(low[phase].logits, high[phase].logits),
            gradients=grow(low[phase].gradients, high[phase].gradients),
        )
        for phase in low
    }


# --- loading ------------------------------------------------------------------------------------------------------

_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


def checkpoint_dtype_bytes(hf_config) -> int | None:
    """Bytes per weight as the checkpoint stores them (the config's `dtype`/`torch_dtype`); None when unstated."""
    for key in ("dtype", "torch_dtype"):
        value = getattr(hf_config, key, None)
        if value is not None:
            return _DTYPE_BYTES.get(str(value).removeprefix("torch."))
    return None


def load_peak_bytes(info: ArchInfo, config: TrainConfig, precision: Precision, hardware: Hardware,
                    hf_config) -> int:
    """CPU RSS at the end of loading, when the weights change dtype on the way in.

    transformers maps the safetensors file; when the stored dtype is the one training wants, the tensors are that
    mapping (no copy, no peak). When it is not, every converted tensor is a new allocation while the whole file's
    pages are mapped and read: runtime + checkpoint + converted weights, before PEFT is imported (measured, CPU:
    a bf16 checkpoint loaded as fp32 or fp32 as bf16 peaks at file + converted + the process baseline, within 4%;
    QLoRA within -6..+12%; docs/benchmarks.md). The file pages are page cache, so the kernel can drop them under
    pressure, but RSS and the guard count them. On a GPU the weights go to the device: the host peak is not device
    memory.
    """
    if hardware.device != "cpu":
        return 0
    stored_bytes = checkpoint_dtype_bytes(hf_config)
    wanted_bytes = precision.trainable_bytes if config.method == "full" else precision.frozen_bytes
    if stored_bytes is None or stored_bytes == wanted_bytes:
        return 0  # QLoRA too: bitsandbytes quantizes tensor by tensor from the mapping (fp32 file, fp32: no peak)
    checkpoint = info.params * stored_bytes
    loaded = weight_bytes(info, config, precision)
    return CPU_PROCESS_ANON_BYTES + cpu_file_pages_bytes() + checkpoint + loaded


# --- putting it together ------------------------------------------------------------------------------------------


@functools.cache
def cpu_file_pages_bytes() -> int:
    """Read once per process: the estimate must not drift between the calls of one batch solve."""
    from memfit.system import mapped_file_bytes

    own = mapped_file_bytes()
    return int(CPU_FILE_PAGES_RATIO * (own if own is not None else CPU_FILE_PAGES_FALLBACK_BYTES))


def _runtime_bytes(hardware: Hardware, config: TrainConfig, dynamic_bytes: int) -> int:
    if hardware.device == "cuda":
        return CUDA_CONTEXT_BYTES + int(CUDA_ALLOCATOR_SLACK * dynamic_bytes)
    if hardware.device == "mps":
        return MPS_RUNTIME_BYTES
    peft = CPU_PEFT_IMPORT_BYTES if config.uses_adapters else 0
    return CPU_PROCESS_ANON_BYTES + peft + cpu_file_pages_bytes()


def estimate_memory(hf_config, config: TrainConfig, hardware: Hardware, model_name: str = "model") -> Estimate:
    """The per-device breakdown for one configuration (batch size and all) on `hardware`."""
    precision = resolve_precision(config.dtype, hardware.device)
    info = arch_info(hf_config)
    notes: list[str] = []
    shards = max(1, hardware.num_gpus)
    zero = hardware.zero

    shapes = trainable_shapes(info, config)
    trainable = sum(math.prod(shape) for shape in shapes)
    weights = weight_bytes(info, config, precision)
    adapters = trainable * precision.trainable_bytes if config.uses_adapters else 0
    state_bytes = precision.trainable_bytes
    optimizer = optimizer_state_bytes(config.optimizer, shapes, state_bytes)
    gradients = trainable * precision.trainable_bytes

    fsdp = hardware.engine == "fsdp"
    if fsdp and zero != 3:
        raise UserError(f"FSDP shards fully (counted as ZeRO-3), not at ZeRO-{zero}", hint="drop --zero with fsdp")
    if zero >= 1:
        # DeepSpeed's layout: 16-bit model and gradients, fp32 master weights inside the optimizer.
        if precision.autocast and not fsdp:
            trained_model_bytes = trainable * precision.compute_bytes
            if config.method == "full":
                weights = info.params * precision.compute_bytes
            else:
                adapters = trained_model_bytes
            gradients = trainable * precision.compute_bytes
            optimizer += trainable * 4
            notes.append("ZeRO with mixed precision: 16-bit weights and gradients, fp32 master copy in the optimizer")
        elif precision.autocast:
            notes.append("FSDP with mixed precision: fp32 sharded trained weights, gradients and optimizer states; "
                         "layers gathered in 16-bit")
        optimizer //= shards
        if zero >= 2:
            gradients //= shards
        if zero >= 3:
            gathered = ZERO3_GATHERED_LAYERS * info.largest_layer_params * precision.compute_bytes
            weights = weights // shards + gathered
            adapters //= shards
            engine = "FSDP (FULL_SHARD)" if fsdp else "ZeRO-3"
            notes.append(f"{engine} partitions weights {shards} ways and gathers {ZERO3_GATHERED_LAYERS} layers at a "
                         "time")

    host_offload = 0
    if hardware.offload == "cpu":
        if zero == 0:
            notes.append("--offload cpu needs --zero 1, 2 or 3 (DeepSpeed); ignored")
        else:
            host_offload += optimizer * shards
            optimizer = 0
            if fsdp:
                # FSDP's CPU offload holds the sharded gradients there too (the optimizer steps on the CPU).
                host_offload += (gradients + adapters) * shards
                gradients = adapters = 0
            if zero >= 3:
                host_offload += weights * shards
                weights = ZERO3_GATHERED_LAYERS * info.largest_layer_params * precision.compute_bytes
            notes.append(f"offloaded to CPU RAM (all ranks): {host_offload / GB:.1f} GB")

    # DeepSpeed runs a 16-bit model (no autocast copies of fp32 weights); trace what it really runs.
    traced_precision = precision
    # FSDP computes on the gathered 16-bit copies (its param_dtype) with no autocast copies either.
    if zero >= 1 and precision.autocast:
        traced_precision = Precision(precision.name, precision.compute_dtype, precision.compute_dtype,
                                     precision.compute_dtype)
    # The trace holds unsharded gradients; scale them to what this device really keeps, then take the phase
    # (forward, loss head, backward) with the highest total.
    traced_gradient_bytes = trainable * traced_precision.trainable_bytes
    gradient_ratio = gradients / traced_gradient_bytes if traced_gradient_bytes else 0.0
    phases = traced_peaks(hf_config, info, config, traced_precision, config.batch_size)
    peak = max(phases.values(), key=lambda p: p.activations + p.logits + p.gradients * gradient_ratio)
    gradients_at_peak = int(peak.gradients * gradient_ratio)
    if config.grad_accum > 1:
        # Gradients stay allocated across micro-steps; each micro-step's peak comes on top of all of them.
        dynamic = gradients + peak.activations + peak.logits
    else:
        dynamic = max(peak.activations + peak.logits + gradients_at_peak, gradients)
    above_gradients = dynamic - gradients
    traced_other = peak.activations + peak.logits
    scale = above_gradients / traced_other if traced_other else 0.0
    activations = int(peak.activations * scale)
    logits = int(peak.logits * scale)
    runtime = _runtime_bytes(hardware, config, activations + logits)
    if shards > 1 and zero == 0:
        runtime += gradients  # DDP's flat gradient buckets are a second copy of the gradients
        notes.append("DDP keeps a second copy of the gradients in its communication buckets")

    if config.method == "full" and precision.autocast and zero == 0:
        notes.append("mixed precision: the fp32 weights are the master copy; autocast makes 16-bit copies per layer")
    if config.uses_adapters and config.quant == "4":
        notes.append("4-bit nf4 base with double quantization; embeddings, norms and lm_head in fp32 (kbit prep)")
    if hardware.device == "cpu":
        notes.append("CPU: memory is process RSS; runtime is the Python+torch process baseline (measured anonymous "
                     "memory + the shared-library pages this machine maps)")

    breakdown = dict(weights=int(weights), adapters=int(adapters), gradients=int(gradients),
                     optimizer=int(optimizer), activations=activations, logits=logits, runtime=int(runtime))
    loading = load_peak_bytes(info, config, precision, hardware, hf_config)
    if loading > sum(breakdown.values()):
        notes.append(f"the peak is loading the checkpoint ({loading / GB:.2f} GB): its weights change dtype on the "
                     "way in, so the mapped file and the converted copy are both resident; a checkpoint saved in "
                     "the training dtype loads without it")
    else:
        loading = 0
    return Estimate(model=model_name, config=config, hardware=hardware, precision=precision.name,
                    params=info.params, trainable_params=trainable, breakdown=breakdown,
                    host_offload_bytes=int(host_offload), notes=notes, load_peak_bytes=int(loading))


# --- solving and advising -----------------------------------------------------------------------------------------


def max_batch_size(hf_config, config: TrainConfig, hardware: Hardware, limit: int = 65536) -> int:
    """The largest micro-batch whose estimate fits in `hardware.memory_bytes` (0 if not even 1 fits).

    Memory grows linearly in the batch at a fixed sequence length, so two estimates give the slope and the
    answer; one more estimate at that answer confirms it (and steps down where rounding put it over).
    """
    def at(batch: int) -> Estimate:
        return estimate_memory(hf_config, config.model_copy(update={"batch_size": batch}), hardware)

    budget = hardware.memory_bytes
    one = at(1)
    if one.total_bytes > budget:
        return 0
    # The slope of the training step alone: a loading peak above it is flat in the batch.
    slope = max(at(2).training_bytes - one.training_bytes, 1)
    guess = min(limit, 1 + (budget - one.training_bytes) // slope)
    while guess > 1 and at(guess).total_bytes > budget:
        guess = max(1, guess - max(1, guess // 50))
    return int(guess)


def grad_accum_for(target_batch: int, micro_batch: int, num_gpus: int) -> int:
    return max(1, math.ceil(target_batch / max(1, micro_batch * num_gpus)))


@dataclass(frozen=True)
class Suggestion:
    change: str  # the flags to use
    why: str
    total_bytes: int  # per device with that change
    saving_bytes: int


def suggestions(hf_config, config: TrainConfig, hardware: Hardware, current_total: int) -> list[Suggestion]:
    """What to change when a configuration does not fit, each with what it saves (largest saving first)."""
    info = arch_info(hf_config)
    options: list[tuple[str, str, dict[str, Any], Hardware]] = []
    if not config.grad_checkpointing:
        options.append(("--grad-checkpointing", "recompute activations in backward", {"grad_checkpointing": True},
                        hardware))
    if config.method == "full":
        options.append(("--method lora", "train adapters, freeze the base", {"method": "lora"}, hardware))
    if config.method != "qlora":
        options.append(("--method qlora", "4-bit base weights + LoRA", {"method": "qlora", "quant": "4"}, hardware))
    if config.uses_adapters and config.lora_rank > 4:
        options.append((f"--lora-rank {config.lora_rank // 2}", "smaller adapters",
                        {"lora_rank": config.lora_rank // 2}, hardware))
    layers = config.lora_layers or info.num_layers
    if config.uses_adapters and layers > 2:
        options.append((f"--lora-layers {layers // 2}", "adapt only the last layers (no activations kept below)",
                        {"lora_layers": layers // 2}, hardware))
    if config.optimizer == "adamw" and config.method == "full":
        options.append(("--optimizer adamw8bit", "8-bit optimizer states", {"optimizer": "adamw8bit"}, hardware))
    if hardware.num_gpus > 1 and hardware.zero < 3:
        options.append((f"--zero {hardware.zero + 1}", "partition more model states across GPUs", {},
                        Hardware(hardware.device, hardware.memory_bytes, hardware.num_gpus, hardware.zero + 1,
                                 hardware.offload)))
    if hardware.zero >= 1 and hardware.offload == "none":
        options.append(("--offload cpu", "optimizer states (and ZeRO-3 weights) in CPU RAM", {},
                        replace(hardware, offload="cpu")))
    if config.seq_len > 256:
        options.append((f"--seq-len {config.seq_len // 2}", "shorter sequences", {"seq_len": config.seq_len // 2},
                        hardware))
    if config.batch_size > 1:
        options.append(("--batch-size 1 --grad-accum " + str(config.batch_size * config.grad_accum),
                        "same effective batch, smaller micro-batch",
                        {"batch_size": 1, "grad_accum": config.batch_size * config.grad_accum}, hardware))
    result = []
    for change, why, update, option_hardware in options:
        try:
            total = estimate_memory(hf_config, config.updated(**update), option_hardware).total_bytes
        except (ValueError, UserError):  # an option that does not apply to this model or config
            continue
        result.append(Suggestion(change, why, total, current_total - total))
    return sorted((item for item in result if item.saving_bytes > 0), key=lambda item: -item.saving_bytes)


def to_json(estimate: Estimate, max_batch: int, grad_accum: int, advice: list[Suggestion]) -> dict[str, Any]:
    """The `memfit estimate --json` object (fields named in DESIGN.md, plus context)."""
    return {
        "model": estimate.model,
        "device": estimate.hardware.device,
        "num_gpus": estimate.hardware.num_gpus,
        "zero": estimate.hardware.zero,
        "offload": estimate.hardware.offload,
        "engine": estimate.hardware.engine,
        "precision": estimate.precision,
        "params": estimate.params,
        "trainable_params": estimate.trainable_params,
        "breakdown": dict(estimate.breakdown),
        "total_bytes": estimate.total_bytes,
        "training_bytes": estimate.training_bytes,
        "load_peak_bytes": estimate.load_peak_bytes,
        "device_memory_bytes": estimate.hardware.memory_bytes,
        "fits": estimate.fits,
        "max_batch_size": max_batch,
        "grad_accum": grad_accum,
        "host_offload_bytes": estimate.host_offload_bytes,
        "suggestions": [
            {"change": item.change, "why": item.why, "total_bytes": item.total_bytes,
             "saving_bytes": item.saving_bytes}
            for item in advice
        ],
        "notes": list(estimate.notes),
        "config": estimate.config.model_dump(),
    }
