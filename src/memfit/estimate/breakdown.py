"""The memory breakdown of one training configuration on one device: the static terms (memfit.estimate.terms), the
traced step's peak above them (memfit.estimate.cuts), the runtime (memfit.estimate.baseline) and a loading peak
(memfit.estimate.loading), put together as an `Estimate`.

Components are attributed at the moment of the peak: gradients count in full, and activations+logits count what
the step holds above them at its highest point.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from memfit.config import TrainConfig
from memfit.estimate import baseline, cuts
from memfit.estimate.baseline import CUDA_CONTEXT_BYTES, MPS_RUNTIME_BYTES
from memfit.estimate.dtypes import Precision, resolve_dtypes, traced_precision
from memfit.estimate.hardware import Hardware
from memfit.estimate.host import HOST_JSON_FIELDS, HostPeak, host_figures
from memfit.estimate.loading import load_peak_bytes, mapped_expert_file_bytes
from memfit.estimate.peaks import TracePeak
from memfit.estimate.terms import ModelStates, kbit_layout_note, model_states
from memfit.models.arch import ArchInfo, arch_info
from memfit.units import format_gb


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
            return baseline.idle_process_bytes()
        return baseline.runtime_bytes(self.hardware, self.config, 0)


def estimate_memory(hf_config, config: TrainConfig, hardware: Hardware, model_name: str = "model", *,
                    phases: dict[str, TracePeak] | None = None) -> Estimate:
    """The per-device breakdown for one configuration (batch size and all) on `hardware`.

    `phases`: the full-depth traced peaks to use at `config.batch_size` (what `PeakLines.at` gives); by default
    they are traced (or read from the cache) at that batch size."""
    precision = resolve_dtypes(config.dtype, hardware.device)
    info = arch_info(hf_config)
    notes: list[str] = []
    states = model_states(info, config, precision, hardware, notes)
    # Trace what really runs; the trace holds unsharded gradients: scale them to what this device really keeps,
    # then take the phase (forward, loss head, backward) with the highest total.
    traced = traced_precision(precision, hardware)
    if phases is None:
        phases = cuts.traced_peaks(hf_config, info, config, traced, config.batch_size)
    peak_phase, activations, logits = _held_above_gradients(phases, states, config, traced)
    context, context_source = baseline.cuda_context_bytes() if hardware.device == "cuda" else (CUDA_CONTEXT_BYTES, "")
    if context_source.startswith("measured"):
        notes.append(f"CUDA context {format_gb(context)}: {context_source}")
    runtime = _runtime(hf_config, info, config, precision, hardware, states, activations + logits, notes)
    _setting_notes(info, config, precision, hardware, notes)
    breakdown = dict(weights=int(states.weights), adapters=int(states.adapters), gradients=int(states.gradients),
                     optimizer=int(states.optimizer), activations=activations, logits=logits, runtime=int(runtime))
    loading = _loading_peak(hf_config, info, config, precision, hardware, sum(breakdown.values()), notes)
    return Estimate(model=model_name, config=config, hardware=hardware, precision=precision.name,
                    params=info.params, trainable_params=states.trainable, breakdown=breakdown,
                    host_offload_bytes=int(states.host_offload), notes=notes, load_peak_bytes=int(loading),
                    peak_phase=peak_phase, active_params=info.active_params, num_experts=info.num_experts,
                    experts_per_token=info.experts_per_token,
                    host=host_figures(info, config, precision, hardware, hf_config, int(states.host_offload)),
                    cuda_context_bytes=context)


def _held_above_gradients(phases: dict[str, TracePeak], states: ModelStates, config: TrainConfig,
                          traced: Precision) -> tuple[str, int, int]:
    """The phase that peaks, and the activations and logits it holds above the gradients at that moment."""
    traced_gradient_bytes = states.trainable * traced.trainable_bytes
    gradients = states.gradients
    gradient_ratio = gradients / traced_gradient_bytes if traced_gradient_bytes else 0.0
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
    return peak_phase, int(peak.activations * scale), int(peak.logits * scale)


def _runtime(hf_config, info: ArchInfo, config: TrainConfig, precision: Precision, hardware: Hardware,
             states: ModelStates, dynamic_bytes: int, notes: list[str]) -> int:
    """The runtime term: the process baseline, plus what the engine or the checkpoint's mapping keeps besides."""
    runtime = baseline.runtime_bytes(hardware, config, dynamic_bytes)
    expert_pages = mapped_expert_file_bytes(info, hardware, hf_config, precision)
    if expert_pages:
        runtime += expert_pages
        notes.append(f"CPU: the checkpoint's per-expert tensors stay mapped after transformers fuses them "
                     f"({format_gb(expert_pages)} of file pages in the runtime)")
    if max(1, hardware.num_gpus) > 1 and hardware.zero == 0:
        runtime += states.gradients  # DDP's flat gradient buckets are a second copy of the gradients
        notes.append("DDP keeps a second copy of the gradients in its communication buckets")
    return runtime


def _setting_notes(info: ArchInfo, config: TrainConfig, precision: Precision, hardware: Hardware,
                   notes: list[str]) -> None:
    if config.method == "full" and precision.autocast and hardware.zero == 0:
        notes.append("mixed precision: the fp32 weights are the master copy; autocast makes 16-bit copies per layer")
    if config.uses_adapters and config.quant != "none":
        notes.append(kbit_layout_note(config, precision))
    if hardware.device == "cpu":
        notes.append("CPU: memory is process RSS; runtime is the Python+torch process baseline (measured anonymous "
                     "memory + the shared-library pages this machine maps)")
        from memfit.allocator import DEFAULT_MMAP_THRESHOLD_BYTES, DEFAULT_POLICY, POLICY_ENV, chosen_policy

        policy = chosen_policy()
        kv_bytes = config.batch_size * config.seq_len * info.kv_width * precision.compute_bytes
        if policy == "threshold" and config.uses_adapters and kv_bytes < DEFAULT_MMAP_THRESHOLD_BYTES:
            # Not modelled: which freed heap chunks glibc reuses. In the CPU accuracy table every LoRA case more than
            # 10% short on the model part has key/value tensors under the threshold, and every LoRA case above it is
            # within 10% (benchmarks/heap_retention.py, estimate_accuracy.py); a measurement, not a fitted term.
            notes.append(f"CPU: this micro-batch's key/value tensors ({kv_bytes / 2**10:,.0f} KiB) are under glibc's "
                         "1 MiB mmap threshold, so they and smaller ones come from the heap, which keeps much of "
                         "what a step frees: the real peak can run above this estimate (by 10-27% of its model "
                         "part on the whole smollm2-135m, LoRA, batch 2-4 x 128-256: "
                         "benchmarks/heap_retention.py); `memfit probe` measures it")
        if policy != DEFAULT_POLICY:
            # The estimate models RSS under the default policy, where freed tensors go back at once.
            notes.append(f"{POLICY_ENV}={policy}: the heap keeps what a step frees until the step ends, so "
                         "the peak runs above this estimate (28-32% with trim on 30-layer smollm2-135m LoRA: "
                         "benchmarks/allocator_policies.py)")


def _loading_peak(hf_config, info: ArchInfo, config: TrainConfig, precision: Precision, hardware: Hardware,
                  training_bytes: int, notes: list[str]) -> int:
    """The loading peak when it is above the training step's (0 when not), with the note that says why."""
    loading = load_peak_bytes(info, config, precision, hardware, hf_config)
    if loading > training_bytes and hardware.device != "cpu":
        notes.append(f"the peak is loading ({format_gb(loading)}): the fused experts arrive in "
                     f"{precision.frozen_bytes * 8}-bit on the device before memfit quantizes them to 4-bit")
    elif loading > training_bytes:
        notes.append(f"the peak is loading the checkpoint ({format_gb(loading)}): its weights change dtype on the "
                     "way in, so the mapped file and the converted copy are both resident; a checkpoint saved in "
                     "the training dtype loads without it")
    else:
        loading = 0
    return loading


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
