"""The memory breakdown of one training configuration, per device, and the largest batch that fits.

Components (bytes per device):
- weights: every parameter at the dtype it is stored in (trained params at the trainable dtype; a frozen LoRA base
  at the compute dtype; a 4-bit base at 0.5 byte/weight plus nf4 block constants, an 8-bit one at a byte, with the
  embeddings, norms and lm_head in the compute dtype, or fp32 under `--qlora-upcast`: `unquantized_bytes`);
- adapters: LoRA A/B matrices (fp32 under mixed precision, as PEFT keeps them);
- gradients: one per trained parameter, in its dtype;
- optimizer: states by optimizer and dtype (AdamW m+v, 8-bit blockwise states, Adafactor's factored moments),
  plus the fp32 master copy where the engine keeps one apart from the weights (DeepSpeed ZeRO);
- activations, logits: the peak of one traced micro-step (memfit.estimate.trace), on 2- and 4-layer cuts of the
  real architecture extrapolated per decoder layer;
- runtime: the process baseline on CPU, the CUDA context and allocator slack on CUDA.

Traces are kept on disk (memfit.cache): a second estimate of the same model and settings runs no trace,
and one from a cached resolution (`memfit estimate`, `recommend`) imports neither torch nor transformers. The
largest batch is solved on lines through the traces at batch 1 and 2 and checked by the traced estimate at the
answer (`solve_max_batch`).

Components are attributed at the moment of the peak: gradients count in full, and activations+logits count what
the step holds above them at its highest point.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memfit import cache
from memfit.config import TrainConfig
from memfit.errors import MemfitError, UserError
from memfit.estimate.host import HOST_JSON_FIELDS, HostPeak, host_figures
from memfit.estimate.peaks import PeakLines, TracePeak, peaks_from_json, peaks_to_json
from memfit.estimate.solve import largest_fitting
from memfit.libraries import import_peft
from memfit.models.arch import ArchInfo, arch_info

from memfit.units import GB, MB, format_gb

# CPU runtime = a training process's anonymous baseline + its file-backed pages (libraries): what the process holds
# when the model holds nothing. Both are measured, not fitted: `python benchmarks/derive_constants.py` trains a nano
# llama (~0.2 MB of weights) in fresh child processes (full; LoRA with PEFT but no bitsandbytes, as --quant none
# imports it; QLoRA with both), reads their RssAnon/RssFile, and writes the medians to constants.json beside this
# file with the machine, versions and command (docs/benchmarks.md, "The estimator's CPU baseline, derived").
# Anonymous: Python, torch, transformers, PEFT (without bitsandbytes), memfit and the model code imported and 3
# steps run. bitsandbytes, imported by PEFT where a 4/8-bit layer is built, adds to it.
_MEASURED = json.loads((Path(__file__).with_name("constants.json")).read_text())["cpu"]
CPU_PROCESS_ANON_BYTES: int = _MEASURED["process_anon_bytes"]
# PEFT's import over a full fine-tune's process, with bitsandbytes (QLoRA); a --quant none process imports PEFT
# without bitsandbytes (memfit.libraries), this much less: the two differ by little more than bitsandbytes.
CPU_PEFT_IMPORT_BYTES: int = _MEASURED["peft_import_bytes"]
CPU_BITSANDBYTES_IMPORT_BYTES: int = _MEASURED["bitsandbytes_import_bytes"]
# File-backed pages vary with the page cache (more right after an install), so they are read from this process,
# which maps the same libraries; a training process touches more of them: the ratio of the training child's RssFile
# to an estimating process's (derive_constants.py). Where /proc is absent, an estimating process's reading.
CPU_FILE_PAGES_RATIO: float = _MEASURED["file_pages_ratio"]
CPU_FILE_PAGES_FALLBACK_BYTES: int = _MEASURED["file_pages_fallback_bytes"]
# CUDA context with cuBLAS/cuDNN handles and workspaces: what nvidia-smi shows beyond the caching allocator's
# reserved memory. Published: 723 MiB after the first `torch.randn(1).cuda()` (discuss.pytorch.org/t/73021, 2020,
# before CUDA 11.7's lazy module loading, which torch now enables and which loads kernels as they are first used).
# Not measured by memfit on a GPU yet (none lent); `benchmarks/estimate_accuracy.py --device cuda` compares.
CUDA_CONTEXT_BYTES = 512 * MB
MPS_RUNTIME_BYTES = 256 * MB
# The caching allocator rounds and fragments: reserved exceeds allocated by a few percent of what churns.
CUDA_ALLOCATOR_SLACK = 0.05
# DeepSpeed ZeRO-3 keeps the layer being computed and the prefetched next one gathered.
ZERO3_GATHERED_LAYERS = 2


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
    # The traced phase (forward, head, backward) whose peak sets the activations and logits.
    peak_phase: str = ""
    # Mixture of experts: the parameters one token runs through (top-k experts), the experts per layer, top-k.
    active_params: int = 0
    num_experts: int = 0
    experts_per_token: int = 0
    # On CUDA: host RAM per phase (load, train, save), per process and per machine (memfit.estimate.host).
    host: HostPeak | None = None
    # The CUDA context in the runtime term: this machine's NVML measurement when one is recorded, else the constant.
    cuda_context_bytes: int = CUDA_CONTEXT_BYTES

    @property
    def training_bytes(self) -> int:
        return sum(self.breakdown.values())

    @property
    def total_bytes(self) -> int:
        return max(self.training_bytes, self.load_peak_bytes)

    @property
    def fits(self) -> bool:
        return self.process_bytes <= self.hardware.memory_bytes

    # Three figures, each named for the counter it predicts. On CUDA the runtime term is the context (outside the
    # caching allocator) plus the allocator's slack (inside what it reserves); elsewhere there is one counter, the
    # process's memory (RSS; unified memory on MPS), and the three are the same figure.
    @property
    def allocated_peak_bytes(self) -> int:
        """torch.cuda.max_memory_allocated: the tensors alone."""
        if self.hardware.device != "cuda":
            return self.total_bytes
        return self.total_bytes - self.breakdown.get("runtime", 0)

    @property
    def reserved_peak_bytes(self) -> int:
        """torch.cuda.max_memory_reserved: the caching allocator's blocks, what the guard watches on CUDA."""
        if self.hardware.device != "cuda":
            return self.total_bytes
        return self.allocated_peak_bytes + max(0, self.breakdown.get("runtime", 0) - self.cuda_context_bytes)

    @property
    def process_bytes(self) -> int:
        """What nvidia-smi (or ps, Activity Monitor) shows for the process: reserved + the CUDA context. The verdict."""
        return self.total_bytes

    @property
    def baseline_bytes(self) -> int:
        """The part of `process_bytes` no model setting changes: on CPU the process baseline of the phase that peaks
        (loading: before PEFT is imported), on CUDA the context, on MPS the runtime. `process_bytes - baseline_bytes`
        is the model-dependent part, which benchmarks/estimate_accuracy.py reports the error on."""
        if self.hardware.device != "cpu":
            return self.cuda_context_bytes if self.hardware.device == "cuda" else MPS_RUNTIME_BYTES
        if self.load_peak_bytes > self.training_bytes:
            return CPU_PROCESS_ANON_BYTES + cpu_file_pages_bytes()
        return _runtime_bytes(self.hardware, self.config, 0)


# --- precision, by dtype names -------------------------------------------------------------------------------------

_NAMED_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# memfit.precision's contract (compute, trainable, frozen dtype) by name; tests/test_estimate.py checks it against
# resolve_precision for every dtype and device.
_PRECISIONS = {"fp32": ("float32", "float32", "float32"), "bf16": ("bfloat16", "float32", "bfloat16"),
               "fp16": ("float16", "float32", "float16"), "bf16-pure": ("bfloat16", "bfloat16", "bfloat16")}
# Where none of these exists, no CUDA (or ROCm, or WSL GPU) driver is loaded: torch.cuda.is_available() is False.
_GPU_DRIVER_PATHS = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/kfd", "/dev/dxg")


@dataclass(frozen=True)
class Precision:
    """memfit.precision.Precision by dtype names: what the arithmetic reads, without importing torch."""

    name: str
    compute: str
    trainable: str
    frozen: str

    @property
    def autocast(self) -> bool:
        return self.name in ("bf16", "fp16")

    @property
    def compute_bytes(self) -> int:
        return _NAMED_BYTES[self.compute]

    @property
    def trainable_bytes(self) -> int:
        return _NAMED_BYTES[self.trainable]

    @property
    def frozen_bytes(self) -> int:
        return _NAMED_BYTES[self.frozen]

    def torch(self):
        """The memfit.precision.Precision with torch dtypes (what a trace runs with)."""
        import torch

        from memfit.precision import Precision as TorchPrecision

        return TorchPrecision(self.name, getattr(torch, self.compute), getattr(torch, self.trainable),
                              getattr(torch, self.frozen))


def _no_gpu_driver() -> bool:
    if sys.platform == "darwin":
        return True
    return sys.platform.startswith("linux") and not any(os.path.exists(path) for path in _GPU_DRIVER_PATHS)


def resolve_dtypes(dtype: str, device: str) -> Precision:
    """`--dtype` on `device` as memfit.precision.resolve_precision resolves it. torch is imported only to ask
    whether a CUDA GPU supports bf16 (`auto` on cuda where a GPU driver is present) and for its error messages."""
    if dtype == "auto" and (device in ("cpu", "mps") or (device == "cuda" and "torch" not in sys.modules
                                                           and _no_gpu_driver())):
        dtype = {"cpu": "fp32"}.get(device, "bf16")
    if dtype in _PRECISIONS and not (dtype == "fp16" and device == "cpu"):
        return Precision(dtype, *_PRECISIONS[dtype])
    from memfit.precision import resolve_precision

    real = resolve_precision(dtype, device)
    names = (str(d).removeprefix("torch.") for d in (real.compute_dtype, real.trainable_dtype, real.frozen_dtype))
    return Precision(real.name, *names)


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
    # Fused experts: nf4 with --quant 4, left in the frozen dtype with --quant 8 (memfit.train.experts).
    experts = _nf4_bytes(info.expert_params) if config.quant == "4" else info.expert_params * precision.frozen_bytes
    rest = info.params - info.linear_weight_params - info.expert_params  # embeddings, norms, head, routers
    return int(quantized + experts + rest * unquantized_bytes(config, precision))


def unquantized_bytes(config: TrainConfig, precision: Precision) -> int:
    """Bytes per weight of a k-bit base's unquantized params (embeddings, norms, lm_head): the dtype they were loaded
    in (memfit.train.model.prepare_kbit), or fp32 after `--qlora-upcast` (PEFT's prepare_model_for_kbit_training)."""
    return 4 if config.qlora_upcast else precision.frozen_bytes


def trainable_shapes(info: ArchInfo, config: TrainConfig) -> list[tuple[int, ...]]:
    if config.method == "full":
        return list(info.param_shapes)
    from memfit.train.experts import EXPERTS_TARGET, experts_targeted

    shapes: list[tuple[int, ...]] = []
    linear_targets = config.lora_targets
    if experts_targeted(config.lora_targets):
        # PEFT's target_parameters: A (r x experts, in) and B (out, r x experts) per fused expert weight.
        for weight in info.expert_targets(config.lora_layers):
            rank = config.lora_rank * weight.num_experts
            shapes += [(rank, weight.in_features), (weight.out_features, rank)]
        named = [t.strip() for t in config.lora_targets.split(",") if t.strip() and t.strip() != EXPERTS_TARGET]
        if not named:
            return shapes
        linear_targets = ",".join(named)
    for linear in info.lora_targets(linear_targets, config.lora_layers):
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


_TRACE_CACHE: dict[str, dict[str, TracePeak]] = {}
# Traces this process ran (cache misses): tests and benchmarks/estimate_speed.py read it.
TRACE_STATS = {"traced": 0, "from_disk": 0}
# Settings no trace reads (the loop, the optimizer, the guard, the data, how processes shard): left out of the key
# so that estimates differing only in them share their traces. The batch size is keyed on its own; everything
# else (a new field too) is in the key.
NOT_TRACED = frozenset({
    "batch_size", "grad_accum", "optimizer", "lr", "warmup_steps", "max_steps", "epochs", "max_grad_norm", "seed",
    "packing", "group_by_length", "compile", "log_every", "distributed", "offload", "max_memory", "memory_threshold",
    "memory_report_interval", "save_every", "keep_checkpoints", "memory_sample_interval", "eval_every",
    "tensorboard", "supervise", "max_restarts", "reload_interval", "lora_layers", "max_host_memory",
})


def _cut_config(hf_config, num_layers: int):
    cut = copy.deepcopy(hf_config)
    text = cut.get_text_config() if hasattr(cut, "get_text_config") else cut
    depth = _attr_depth(text)
    for name in ("num_hidden_layers", "n_layer"):
        if hasattr(text, name):
            setattr(text, name, num_layers)
    # Per-layer lists (gemma-2's sliding/global `layer_types`, deepseek-v4's `mlp_layer_types`, ...) must match the
    # new depth: any list as long as the model is deep.
    per_layer = [name for name, value in vars(text).items() if isinstance(value, list) and depth > 1
                 and len(value) == depth]
    for name in dict.fromkeys(["layer_types", *per_layer]):
        value = getattr(text, name, None)
        if isinstance(value, list) and value:
            try:
                setattr(text, name, [value[i % len(value)] for i in range(num_layers)])
            except AttributeError:  # a read-only property computed from the depth (mamba): already cut
                pass
    return cut


def _attr_depth(text_config) -> int:
    for name in ("num_hidden_layers", "n_layer"):
        if isinstance(getattr(text_config, name, None), int):
            return getattr(text_config, name)
    return 0


def _trace_key(hf_config, config: TrainConfig, precision: Precision, num_layers: int | tuple[int, ...],
               batch_size: int | str, kind: str = "trace") -> str:
    settings = config.model_dump(exclude=set(NOT_TRACED & set(TrainConfig.model_fields)))
    if config.quant == "none":
        settings.pop("qlora_upcast", None)  # it changes nothing without a k-bit base: those traces are shared
    return cache.digest(kind, cache.config_key(hf_config), settings, precision, num_layers,
                        batch_size)


def _cached_cut(key: str) -> dict[str, TracePeak] | None:
    if key not in _TRACE_CACHE:
        stored = cache.load("trace", key)
        if stored is None:
            return None
        TRACE_STATS["from_disk"] += 1
        _TRACE_CACHE[key] = peaks_from_json(stored)
    return _TRACE_CACHE[key]


def _trace_cut(hf_config, config: TrainConfig, precision: Precision, num_layers: int,
               batch_size: int) -> dict[str, TracePeak]:
    """One cut of the model traced at one batch size: from this process, else the disk cache, else traced."""
    key = _trace_key(hf_config, config, precision, num_layers, batch_size)
    if _cached_cut(key) is None:
        if cache.is_record(hf_config):
            raise cache.CacheMiss(f"no cached trace of {num_layers} layers at batch {batch_size}")
        import torch

        # Building the cut (weight init, LoRA init) draws from the global RNG, and only on a cache miss: keep it
        # off the caller's stream, or a training run's dropout masks would depend on what was estimated before.
        with torch.random.fork_rng(devices=[]):
            try:
                _TRACE_CACHE[key] = _trace_cut_uncached(hf_config, config, precision.torch(), num_layers,
                                                        batch_size)
            except (MemfitError, cache.CacheMiss, KeyboardInterrupt, MemoryError):
                raise
            except Exception as error:  # noqa: BLE001 - the model's own code failing on fake tensors
                raise _untraceable(hf_config, error) from None
        TRACE_STATS["traced"] += 1
        cache.save("trace", key, peaks_to_json(_TRACE_CACHE[key]))
    return _TRACE_CACHE[key]


def _untraceable(hf_config, error: Exception) -> UserError:
    """One line for a model whose training step cannot run on fake tensors (the estimate needs that trace)."""
    import transformers

    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    first = " ".join(str(error).split())[:160] or type(error).__name__
    if "does not support gradient checkpointing" in first or "does not support activation checkpointing" in first:
        return UserError(f"model_type {getattr(text, 'model_type', '?')!r} does not support gradient checkpointing "
                         f"in transformers {transformers.__version__}", hint="pass --no-grad-checkpointing")
    return UserError(
        f"cannot estimate model_type {getattr(text, 'model_type', '?')!r}: its training step does not run on fake "
        f"tensors with transformers {transformers.__version__} ({type(error).__name__}: {first})",
        hint="`memfit probe` measures what fits by running real steps; docs/benchmarks.md lists the architectures "
             "estimated (python benchmarks/architecture_sweep.py)",
    )


def _trace_cut_uncached(hf_config, config: TrainConfig, precision, num_layers: int,
                        batch_size: int) -> dict[str, TracePeak]:
    """`precision`: memfit.precision.Precision (torch dtypes)."""
    import logging

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    # A step that cannot run on fake tensors becomes one line (`_untraceable`); torch would first log the failing
    # meta kernel's traceback. Set here: importing torch resets its loggers' levels.
    logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)

    from memfit.models.arch import build_meta_model, decoder_layers
    from memfit.estimate.trace import fakeify_, trace_step
    from memfit.train.model import attn_implementation

    cut = _cut_config(hf_config, num_layers)
    cut.use_cache = False

    model = build_meta_model(cut, attn_implementation=attn_implementation(config))
    if config.method == "full":
        model.to(precision.trainable_dtype)
    else:
        model.to(precision.frozen_dtype)
        if config.quant != "none":
            # Emulate a k-bit base: matmuls dequantize to the compute dtype; the rest stays in the frozen dtype
            # (memfit.train.model.prepare_kbit), or is fp32 after prepare_model_for_kbit_training (--qlora-upcast).
            if config.qlora_upcast:
                for name, param in model.named_parameters():
                    if param.dim() < 2 or "embed" in name or "lm_head" in name or "wte" in name or "wpe" in name:
                        param.data = param.data.to(torch.float32)
            if config.quant == "4":
                _dequantized_on_access(model)
    for param in model.parameters():
        param.requires_grad_(config.method == "full")
    head = model.get_output_embeddings()
    last_layer = decoder_layers(model)[-1]
    if config.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.uses_adapters:
            model.enable_input_require_grads()
    if config.uses_adapters:
        import_peft()
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


def _dequantized_on_access(model) -> None:
    """4-bit fused experts (memfit.train.experts) are a bitsandbytes parametrization: each time the experts run,
    their weights are dequantized into a new 16-bit tensor, which the expert matmul keeps for backward. Make the
    traced model do the same (a copy per access, of the frozen dtype), so the trace counts those copies."""
    import torch
    from torch.nn.utils import parametrize

    from memfit.train.experts import fused_expert_weights

    class Dequantize(torch.nn.Module):
        def forward(self, stored):
            with torch.no_grad():
                return stored.clone()

    for weight in fused_expert_weights(model):
        parametrize.register_parametrization(weight.module, weight.param_name, Dequantize(), unsafe=True)


def layer_period(hf_config) -> int:
    """After how many decoder layers the layer kinds repeat (gemma-2: sliding, global → 2; gemma-3: 5 sliding + 1
    global → 6; most models: 1), from the config's `layer_types`. No repeat: the number of layers."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    kinds = getattr(text, "layer_types", None)
    if kinds is None and isinstance(getattr(hf_config, "text_config", None), dict):  # a cached record
        kinds = hf_config.text_config.get("layer_types")
    if not isinstance(kinds, list) or not kinds:
        return 1
    for period in range(1, len(kinds) // 2 + 1):
        if all(kind == kinds[index % period] for index, kind in enumerate(kinds)):
            return period
    return len(kinds)


def cuts_of(hf_config, info: ArchInfo) -> tuple[int, ...]:
    """The cuts traced: one period of layers and two (1 and 2 layers for most models), or the whole model when it
    is no deeper than that. Against a trace of the whole depth (`python benchmarks/trace_cuts.py`, docs/
    benchmarks.md "Which cuts of a model the estimator traces"; smollm2-135m, llama-3.2-1b, gemma-2-2b) these cuts
    gave the same bytes in most settings and erred over, never under (at most +0.65% at seq 1024, +13% once at
    seq 2048), as the 2- and 4-layer cuts did (+8.9%, +13%), at about 3/4 of their time."""
    period = layer_period(hf_config)
    return (info.num_layers,) if info.num_layers <= 2 * period else (period, 2 * period)


def cut_lines(hf_config, config: TrainConfig, precision: Precision, num_layers: int) -> PeakLines:
    """One cut's peaks as lines in the batch size, through its traces at batch 1 and 2."""
    return PeakLines(_trace_cut(hf_config, config, precision, num_layers, 1),
                     _trace_cut(hf_config, config, precision, num_layers, 2))


_LINES_HOLD: dict[str, int] = {}


def lines_hold_to(hf_config, info: ArchInfo, config: TrainConfig, precision: Precision) -> int:
    """The largest batch at which every cut's trace was found on its lines through batch 1 and 2, byte for byte
    (0: none). A cut's phase peak is the highest of the live bytes after each op of the step, each of which grows
    linearly in the batch (a fixed sequence of ops): a convex function of the batch. One that meets a line at 1,
    2 and N is that line from 1 to N, so every batch up to N is served from the lines, exactly as its traces
    would be (`solve_max_batch` records N when its check finds that)."""
    key = _trace_key(hf_config, config, precision, cuts_of(hf_config, info), "-", kind="lines")
    if key not in _LINES_HOLD:
        stored = cache.load("lines", key)
        _LINES_HOLD[key] = int(stored) if isinstance(stored, int) else 0
    return _LINES_HOLD[key]


def _lines_held(hf_config, info: ArchInfo, config: TrainConfig, precision: Precision, batch_size: int) -> None:
    """Record that the traces at `batch_size` lie on the lines (checked by the caller), if that is news."""
    if batch_size > lines_hold_to(hf_config, info, config, precision):
        key = _trace_key(hf_config, config, precision, cuts_of(hf_config, info), "-", kind="lines")
        _LINES_HOLD[key] = batch_size
        cache.save("lines", key, batch_size)


def traced_peaks(hf_config, info: ArchInfo, config: TrainConfig, precision: Precision,
                 batch_size: int) -> dict[str, TracePeak]:
    """Peak of one micro-step for the whole depth, from traces of two cuts (`cuts_of`).

    Decoder layers are identical (or alternate with period 2), so the saved activations grow by the same amount
    per layer; only layers that train (or lie after one that trains) hold activations for backward.
    """
    cuts = cuts_of(hf_config, info)
    trained_layers = info.num_layers
    if config.uses_adapters and config.lora_layers:
        trained_layers = min(config.lora_layers, info.num_layers)
    held_to = lines_hold_to(hf_config, info, config, precision) if batch_size > 2 else 0

    def cut_at(num_layers: int) -> dict[str, TracePeak]:
        key = _trace_key(hf_config, config, precision, num_layers, batch_size)
        if batch_size <= held_to and _cached_cut(key) is None:
            return cut_lines(hf_config, config, precision, num_layers).at(batch_size)
        return _trace_cut(hf_config, config, precision, num_layers, batch_size)

    if len(cuts) == 1:
        return cut_at(info.num_layers)
    short, long = cuts
    low = cut_at(short)
    high = cut_at(long)
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
    a bf16 checkpoint loaded as fp32 or fp32 as bf16 peaks at file + converted + the process baseline, +4..+7%;
    QLoRA within -4%; docs/benchmarks.md). The file pages are page cache, so the kernel can drop them under
    pressure, but RSS and the guard count them. On a GPU the weights go to the device: the host peak is not device
    memory.
    """
    if hardware.device != "cpu":
        if config.quant == "4" and info.expert_params:
            # The fused experts arrive on the device in the frozen dtype, all of them, before memfit quantizes
            # them one by one (memfit.train.experts): the device holds the 16-bit experts at the end of loading.
            return (weight_bytes(info, config, precision) + _runtime_bytes(hardware, config, 0)
                    + info.expert_params * precision.frozen_bytes - int(_nf4_bytes(info.expert_params)))
        return 0
    stored_bytes = checkpoint_dtype_bytes(hf_config)
    wanted_bytes = precision.trainable_bytes if config.method == "full" else precision.frozen_bytes
    if not info.experts_fused_at_load and (stored_bytes is None or stored_bytes == wanted_bytes):
        return 0  # QLoRA too: bitsandbytes quantizes tensor by tensor from the mapping (fp32 file, fp32: no peak)
    checkpoint = info.params * (stored_bytes or wanted_bytes)
    loaded = weight_bytes(info, config, precision)
    if config.quant == "4" and info.experts:
        # The fused experts are quantized after loading, from a copy in the frozen dtype, one weight at a time;
        # bitsandbytes' CPU kernel holds the weight's fp32 scaled copy, its int32 bucket indices and their uint8
        # form at once (bitsandbytes/backends/default/ops.py quantize_4bit): 9 bytes a weight of the largest.
        loaded += info.expert_params * precision.frozen_bytes - _nf4_bytes(info.expert_params)
        loaded += 9 * max(weight.params for weight in info.experts)
    return CPU_PROCESS_ANON_BYTES + cpu_file_pages_bytes() + checkpoint + int(loaded)


def mapped_expert_file_bytes(info: ArchInfo, hardware: Hardware, hf_config, precision: Precision) -> int:
    """CPU: the file pages of per-expert checkpoint tensors that transformers fused into new tensors while loading.
    They stay resident after loading, since the other tensors are views of the same mapping (measured on tiny
    Mixtral and Qwen3-MoE shapes: benchmarks/estimate_accuracy.py)."""
    if hardware.device != "cpu" or not info.experts_fused_at_load:
        return 0
    return info.expert_params * (checkpoint_dtype_bytes(hf_config) or precision.frozen_bytes)


# --- putting it together ------------------------------------------------------------------------------------------


@functools.cache
def cpu_file_pages_bytes() -> int:
    """Read once per process: the estimate must not drift between the calls of one batch solve.

    The pages are those of a process that imported torch and transformers. One that did not (an estimate made
    from cached traces) uses the figure the last such process read here, kept in the cache; with none kept, it
    imports them to read its own."""
    from memfit.system import mapped_file_bytes

    key = cache.digest("file-pages")
    if not {"torch", "transformers"} <= set(sys.modules):
        kept = cache.load("file-pages", key)
        if isinstance(kept, int):
            return kept
        import torch  # noqa: F401
        import transformers  # noqa: F401
    own = mapped_file_bytes()
    figure = int(CPU_FILE_PAGES_RATIO * (own if own is not None else CPU_FILE_PAGES_FALLBACK_BYTES))
    cache.save("file-pages", key, figure)
    return figure


def cuda_context_bytes() -> tuple[int, str]:
    """The CUDA context and where the figure comes from: this machine's NVML measurement when one is recorded
    (memfit.cuda_context: `memfit system`, train and probe measure it where a GPU is), else CUDA_CONTEXT_BYTES."""
    from memfit.cuda_context import context_bytes

    return context_bytes(CUDA_CONTEXT_BYTES)


def _runtime_bytes(hardware: Hardware, config: TrainConfig, dynamic_bytes: int) -> int:
    if hardware.device == "cuda":
        return cuda_context_bytes()[0] + int(CUDA_ALLOCATOR_SLACK * dynamic_bytes)
    if hardware.device == "mps":
        return MPS_RUNTIME_BYTES
    peft = 0
    if config.uses_adapters:
        peft = CPU_PEFT_IMPORT_BYTES - (CPU_BITSANDBYTES_IMPORT_BYTES if config.quant == "none" else 0)
    return CPU_PROCESS_ANON_BYTES + peft + cpu_file_pages_bytes()


def kbit_layout_note(config: TrainConfig, precision: Precision) -> str:
    """The notes line of a k-bit base: how it is stored, and which dtype its unquantized weights are in."""
    base = ("4-bit nf4 base with double quantization" if config.quant == "4"
            else "8-bit base (bitsandbytes LLM.int8)")
    if config.qlora_upcast:
        return (f"{base}; embeddings, norms and lm_head in fp32 (--qlora-upcast: PEFT's "
                "prepare_model_for_kbit_training)")
    kept = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[precision.frozen]
    return (f"{base}; embeddings, norms and lm_head in {kept}, the compute dtype (--qlora-upcast: fp32, as PEFT's "
            "prepare_model_for_kbit_training)")


def traced_precision(precision: Precision, hardware: Hardware) -> Precision:
    """The dtypes the step really runs with: DeepSpeed runs a 16-bit model (no autocast copies of fp32 weights),
    and FSDP computes on gathered 16-bit copies (its param_dtype) with no autocast copies either."""
    if hardware.zero >= 1 and precision.autocast:
        return Precision(precision.name, precision.compute, precision.compute, precision.compute)
    return precision


def estimate_memory(hf_config, config: TrainConfig, hardware: Hardware, model_name: str = "model", *,
                    phases: dict[str, TracePeak] | None = None) -> Estimate:
    """The per-device breakdown for one configuration (batch size and all) on `hardware`.

    `phases`: the full-depth traced peaks to use at `config.batch_size` (what `PeakLines.at` gives); by default
    they are traced (or read from the cache) at that batch size."""
    precision = resolve_dtypes(config.dtype, hardware.device)
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

    # Trace what really runs; the trace holds unsharded gradients: scale them to what this device really keeps,
    # then take the phase (forward, loss head, backward) with the highest total.
    traced = traced_precision(precision, hardware)
    traced_gradient_bytes = trainable * traced.trainable_bytes
    gradient_ratio = gradients / traced_gradient_bytes if traced_gradient_bytes else 0.0
    if phases is None:
        phases = traced_peaks(hf_config, info, config, traced, config.batch_size)
    peak_phase = max(phases, key=lambda name: phases[name].held + phases[name].gradients * gradient_ratio)
    peak = phases[peak_phase]
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
    expert_pages = mapped_expert_file_bytes(info, hardware, hf_config, precision)
    if expert_pages:
        runtime += expert_pages
        notes.append(f"CPU: the checkpoint's per-expert tensors stay mapped after transformers fuses them "
                     f"({format_gb(expert_pages)} of file pages in the runtime)")
    if shards > 1 and zero == 0:
        runtime += gradients  # DDP's flat gradient buckets are a second copy of the gradients
        notes.append("DDP keeps a second copy of the gradients in its communication buckets")

    if config.method == "full" and precision.autocast and zero == 0:
        notes.append("mixed precision: the fp32 weights are the master copy; autocast makes 16-bit copies per layer")
    if config.uses_adapters and config.quant != "none":
        notes.append(kbit_layout_note(config, precision))
    if hardware.device == "cpu":
        notes.append("CPU: memory is process RSS; runtime is the Python+torch process baseline (measured anonymous "
                     "memory + the shared-library pages this machine maps)")
        from memfit.allocator import DEFAULT_POLICY, POLICY_ENV, chosen_policy

        policy = chosen_policy()
        if policy != DEFAULT_POLICY:
            # The estimate models RSS under the default policy, where freed tensors go back at once.
            notes.append(f"{POLICY_ENV}={policy}: the heap keeps what a step frees until the step ends, so "
                         "the peak runs above this estimate (28-32% with trim on 30-layer smollm2-135m LoRA: "
                         "benchmarks/allocator_policies.py)")

    context, context_source = cuda_context_bytes() if hardware.device == "cuda" else (CUDA_CONTEXT_BYTES, "")
    if context_source.startswith("measured"):
        notes.append(f"CUDA context {format_gb(context)}: {context_source}")
    breakdown = dict(weights=int(weights), adapters=int(adapters), gradients=int(gradients),
                     optimizer=int(optimizer), activations=activations, logits=logits, runtime=int(runtime))
    loading = load_peak_bytes(info, config, precision, hardware, hf_config)
    if loading > sum(breakdown.values()) and hardware.device != "cpu":
        notes.append(f"the peak is loading ({format_gb(loading)}): the fused experts arrive in "
                     f"{precision.frozen_bytes * 8}-bit on the device before memfit quantizes them to 4-bit")
    elif loading > sum(breakdown.values()):
        notes.append(f"the peak is loading the checkpoint ({format_gb(loading)}): its weights change dtype on the "
                     "way in, so the mapped file and the converted copy are both resident; a checkpoint saved in "
                     "the training dtype loads without it")
    else:
        loading = 0
    return Estimate(model=model_name, config=config, hardware=hardware, precision=precision.name,
                    params=info.params, trainable_params=trainable, breakdown=breakdown,
                    host_offload_bytes=int(host_offload), notes=notes, load_peak_bytes=int(loading),
                    peak_phase=peak_phase, active_params=info.active_params, num_experts=info.num_experts,
                    experts_per_token=info.experts_per_token,
                    host=host_figures(info, config, precision, hardware, hf_config, int(host_offload)),
                    cuda_context_bytes=context)


# --- solving and advising -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchSolve:
    batch: int  # the largest micro-batch that fits (0: not even 1)
    how: str  # "batch 1 does not fit" | "traced" (1 or 2) | "lines, checked" | "traced search"
    line_evaluations: int = 0  # estimates computed from the lines (arithmetic, no trace)
    traced_estimates: int = 0  # estimates traced at batch sizes other than 1 and 2 (the check is one), 2 cuts each


def solve_max_batch(hf_config, config: TrainConfig, hardware: Hardware, limit: int = 65536) -> BatchSolve:
    """The largest micro-batch whose estimate fits in `hardware.memory_bytes`, and how it was found.

    Batch 1 and 2 are traced (both cuts). Through them each phase's peak is a line in the batch (PeakLines),
    kept apart for the forward, loss head and layer backward; the estimate's own arithmetic puts them together
    with the terms that do not grow with the batch (weights, optimizer states, the gradients a full fine-tune
    holds at its optimizer step, a loading peak), so the total is flat where those dominate and rises where a
    phase takes over. The largest batch on that curve comes from memfit.estimate.solve (closed form where the curve
    is straight, doubling and bisection where it is not), on arithmetic alone. The traced estimate at that answer
    checks it: when it fits and no phase fell below its line there, the answer stands; otherwise the search goes on
    over traced estimates, bracketed by what is known (a phase's peak can move to another moment of the step as
    the batch grows, and the loss head's chunk grows in steps with the tokens).
    """
    budget = hardware.memory_bytes

    def at(batch: int) -> TrainConfig:
        return config.model_copy(update={"batch_size": batch})

    def traced_total(batch: int) -> int:
        return estimate_memory(hf_config, at(batch), hardware).total_bytes

    one = traced_total(1)
    if one > budget:
        return BatchSolve(0, "batch 1 does not fit")
    if limit <= 1:
        return BatchSolve(1, "traced")
    precision = traced_precision(resolve_dtypes(config.dtype, hardware.device), hardware)
    info = arch_info(hf_config)
    lines = PeakLines(traced_peaks(hf_config, info, at(1), precision, 1),
                      traced_peaks(hf_config, info, at(2), precision, 2))

    def on_lines(batch: int) -> Estimate:
        return estimate_memory(hf_config, at(batch), hardware, phases=lines.at(batch))

    solution = largest_fitting(lambda batch: on_lines(batch).total_bytes, budget, limit, known={1: one})
    answer = solution.batch
    if answer <= 2:  # the lines at 1 and 2 are the traces
        return BatchSolve(answer, "traced", solution.evaluations)

    # The check: the traced estimate at the answer (both cuts). One cut is not enough: llama-3.2-1b, full, seq
    # 2048, no checkpointing, moves its backward peak (from the moment the gradients are all there to one with
    # more activations) at batch 3 in the 4-layer cut but at batch 4 in the 2-layer cut.
    checked = estimate_memory(hf_config, at(answer), hardware)
    if answer > lines_hold_to(hf_config, info, config, precision) and all(
            _trace_cut(hf_config, at(answer), precision, cut, answer)
            == cut_lines(hf_config, at(1), precision, cut).at(answer) for cut in cuts_of(hf_config, info)):
        _lines_held(hf_config, info, at(answer), precision, answer)  # batches up to here: no trace needed
    known = {1: one, 2: on_lines(2).total_bytes, answer: checked.total_bytes}  # the lines at 2: its traces
    if checked.total_bytes > budget:  # a phase rose above its line: search below, on traces
        found = largest_fitting(traced_total, budget, limit, fits=2, over=answer, known=known)
        return BatchSolve(found.batch, "traced search", solution.evaluations, found.evaluations + 1)
    if answer >= limit:
        return BatchSolve(answer, "lines, checked", solution.evaluations, 1)
    # The answer fits. The next batch is over on the lines; it stays over unless a phase fell below its line here
    # (then it may fit): take each phase's shortfall at the answer off its line at the next batch.
    traced = traced_peaks(hf_config, info, at(answer), precision, answer)
    full, following = lines.at(answer), lines.at(answer + 1)
    lowered = {}
    for phase, peak in following.items():
        held_gap = min(0, traced[phase].held - full[phase].held)
        gradient_gap = min(0, traced[phase].gradients - full[phase].gradients)
        held = max(0, peak.held + held_gap)
        lowered[phase] = TracePeak(activations=held - min(held, peak.logits), logits=min(held, peak.logits),
                                   gradients=max(0, peak.gradients + gradient_gap))
    if estimate_memory(hf_config, at(answer + 1), hardware, phases=lowered).total_bytes > budget:
        return BatchSolve(answer, "lines, checked", solution.evaluations, 1)
    found = largest_fitting(traced_total, budget, limit, fits=answer, known=known)
    return BatchSolve(found.batch, "traced search", solution.evaluations, found.evaluations + 1)


def max_batch_size(hf_config, config: TrainConfig, hardware: Hardware, limit: int = 65536) -> int:
    """The largest micro-batch whose estimate fits in `hardware.memory_bytes` (0 if not even 1 fits): see
    `solve_max_batch`."""
    return solve_max_batch(hf_config, config, hardware, limit).batch


def grad_accum_for(target_batch: int, micro_batch: int, num_gpus: int) -> int:
    return max(1, math.ceil(target_batch / max(1, micro_batch * num_gpus)))


def to_json(estimate: Estimate, max_batch: int, grad_accum: int, advice: list) -> dict[str, Any]:
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
        "active_params": estimate.active_params,  # = params for a dense model
        "num_experts": estimate.num_experts or None,
        "experts_per_token": estimate.experts_per_token or None,
        "trainable_params": estimate.trainable_params,
        "breakdown": dict(estimate.breakdown),
        "total_bytes": estimate.total_bytes,  # = process_bytes: the figure the verdict compares
        "allocated_peak_bytes": estimate.allocated_peak_bytes,
        "reserved_peak_bytes": estimate.reserved_peak_bytes,
        "process_bytes": estimate.process_bytes,
        "training_bytes": estimate.training_bytes,
        "load_peak_bytes": estimate.load_peak_bytes,
        "device_memory_bytes": estimate.hardware.memory_bytes,
        "fits": estimate.fits,
        "max_batch_size": max_batch,
        "batch_1_fits": max_batch >= 1,
        "grad_accum": grad_accum,
        "host_offload_bytes": estimate.host_offload_bytes,
        "cuda_context_bytes": estimate.cuda_context_bytes if estimate.hardware.device == "cuda" else None,
        # On CUDA: host RAM (load/train/save), per process and per machine; None elsewhere (the device is the host).
        **(estimate.host.to_json() if estimate.host else dict.fromkeys(HOST_JSON_FIELDS)),
        "suggestions": [item.to_json() for item in advice],  # memfit.estimate.advice.Suggestion
        "notes": list(estimate.notes),
        "config": estimate.config.model_dump(),
    }
