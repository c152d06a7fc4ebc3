"""Host RAM of a run on GPUs: the peak of loading and saving next to the device figures (issue 20 item 4).

On CUDA the device figures say nothing of the host, and the host runs out on its own: loading (transformers builds
the model in host memory before it moves to the GPU, one copy per rank), saving (a checkpoint's tensors gathered on
the CPU before they are written; under FSDP the full state dict, optimizer states too), CPU offload. What the guard
compares with `--max-host-memory` is one process's RSS, and the machine's available memory is shared by all of its
ranks; both figures are here, per phase:

- **load**: the process baseline, the checkpoint's file pages (transformers maps the safetensors files and reads
  every page, counted in RSS while mapped), and, unquantized with a stored dtype other than the one loaded, the
  converted copy beside them (memfit.train.model: `from_pretrained` on the CPU, then `.to(device)`). A k-bit base
  goes to the GPU tensor by tensor (`device_map`): only the mapping. On the machine, the file pages are one page
  cache for all ranks; each rank's converted copy is its own.
- **train**: the baseline and this rank's share of `--offload cpu`'s states.
- **save**: the train figure plus the trained tensors in host memory at once (safetensors' `save_file` turns every
  tensor into bytes before it writes; the final `save_pretrained` too), and under FSDP the optimizer states
  gathered unsharded on rank 0 (memfit.distributed.fsdp); DeepSpeed writes each rank's shard (no gather).
- **merge** (adapters only; memfit does not merge, PEFT's `merge_and_unload` does, on the CPU): the base in 16-bit
  and the adapters. Reported for those who merge; not part of the run's peak.

The baseline is the CPU process's (memfit.estimate: the derived anonymous memory, file pages, PEFT's import) plus
what initialising CUDA adds to host RSS: about 1.2 GB on torch 2.x (1,203 MiB after the first CUDA call,
pytorch/pytorch#106511, 2023; 1.7 GB with CUDA 11.8's lazy loading, pytorch/pytorch#113326). Not measured by memfit
on a GPU yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from memfit.units import GB

CUDA_HOST_RUNTIME_BYTES = int(1.2 * GB)

PHASES = ("load", "train", "save")  # the run's own phases; "merge" is reported beside them
HOST_JSON_FIELDS = ("host_peak_bytes", "host_peak_phase", "host_phases", "host_machine_peak_bytes",
                    "host_merge_bytes")


@dataclass(frozen=True)
class HostInputs:
    """The figures the host arithmetic needs, in bytes (unsharded unless said), taken from the estimator."""

    baseline_bytes: int  # one process on a GPU, before the model: CPU baseline + CUDA's host share
    checkpoint_bytes: int  # the weights as stored on disk (the file pages loading maps)
    converted_bytes: int  # the copy in the loaded dtype when the stored one differs (0: none, or a k-bit load)
    trained_bytes: int  # the tensors a checkpoint holds (all weights for full, the adapters for LoRA)
    gathered_optimizer_bytes: int  # optimizer states gathered unsharded on rank 0 when saving (FSDP), else 0
    offload_bytes: int  # --offload cpu: the states in host RAM, all ranks together
    ranks: int  # processes on the machine (one per GPU)
    merge_bytes: int = 0  # PEFT's merge on the CPU (adapters only), 0 when there is nothing to merge


@dataclass(frozen=True)
class HostPeak:
    phases: dict[str, int]  # one process's host RSS per phase (rank 0's, which saves)
    machine_phases: dict[str, int]  # the machine's host memory per phase, every rank together
    merge_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=lambda name: self.phases[name])

    @property
    def peak_bytes(self) -> int:
        """What the guard's --max-host-memory is compared with: one process's RSS at its highest."""
        return self.phases[self.peak_phase]

    @property
    def machine_peak_bytes(self) -> int:
        return max(self.machine_phases.values())

    def to_json(self) -> dict[str, Any]:
        return {"host_peak_bytes": self.peak_bytes, "host_peak_phase": self.peak_phase,
                "host_phases": dict(self.phases), "host_machine_peak_bytes": self.machine_peak_bytes,
                "host_merge_bytes": self.merge_bytes or None}


def host_peak(inputs: HostInputs) -> HostPeak:
    """The per-phase host figures of one process and of the machine (see the module docstring)."""
    ranks = max(1, inputs.ranks)
    offload_per_rank = inputs.offload_bytes // ranks
    train = inputs.baseline_bytes + offload_per_rank
    phases = {
        "load": inputs.baseline_bytes + inputs.checkpoint_bytes + inputs.converted_bytes,
        "train": train,
        "save": train + inputs.trained_bytes + inputs.gathered_optimizer_bytes,
    }
    # The page cache holds the checkpoint once for the machine; converted copies, baselines, offloaded states and
    # what rank 0 gathers are each process's own.
    machine_train = ranks * inputs.baseline_bytes + inputs.offload_bytes
    machine = {
        "load": ranks * (inputs.baseline_bytes + inputs.converted_bytes) + inputs.checkpoint_bytes,
        "train": machine_train,
        "save": machine_train + inputs.trained_bytes + inputs.gathered_optimizer_bytes,
    }
    notes = []
    if ranks > 1:
        notes.append(f"host RAM: {ranks} ranks on one machine each load their own copy; the machine's peak "
                     f"({machine_peak(machine)}) counts the checkpoint's file pages once (one page cache)")
    return HostPeak(phases, machine, inputs.merge_bytes, notes)


def machine_peak(machine: dict[str, int]) -> str:
    phase = max(machine, key=machine.__getitem__)
    return f"{machine[phase] / GB:.2f} GB, {phase}"


def host_inputs(info, config, precision, hardware, hf_config, offload_bytes: int) -> HostInputs:
    """HostInputs from the estimator's view of a run (memfit.estimate.memory's arch info, config, precision);
    `offload_bytes`: the estimator's host_offload_bytes (all ranks)."""
    from memfit.estimate.baseline import runtime_bytes
    from memfit.estimate.hardware import Hardware
    from memfit.estimate.loading import checkpoint_dtype_bytes
    from memfit.estimate.terms import optimizer_state_bytes, trainable_shapes, weight_bytes

    cpu_baseline = runtime_bytes(Hardware("cpu", 0), config, 0)  # anonymous memory, file pages, PEFT's import
    stored = checkpoint_dtype_bytes(hf_config)
    wanted = precision.trainable_bytes if config.method == "full" else precision.frozen_bytes
    converted = 0
    if config.quant == "none" and stored is not None and stored != wanted:
        converted = weight_bytes(info, config, precision)
    shapes = trainable_shapes(info, config)
    trained = sum(math.prod(shape) for shape in shapes) * precision.trainable_bytes
    fsdp = hardware.engine == "fsdp" and hardware.num_gpus > 1 and hardware.zero == 3
    gathered = optimizer_state_bytes(config.optimizer, shapes, precision.trainable_bytes) if fsdp else 0
    merge = cpu_baseline + info.params * precision.compute_bytes + trained if config.uses_adapters else 0
    return HostInputs(baseline_bytes=cpu_baseline + CUDA_HOST_RUNTIME_BYTES,
                      checkpoint_bytes=info.params * (stored or wanted), converted_bytes=converted,
                      trained_bytes=trained, gathered_optimizer_bytes=gathered, offload_bytes=offload_bytes,
                      ranks=max(1, hardware.num_gpus), merge_bytes=merge)


def host_figures(info, config, precision, hardware, hf_config, offload_bytes: int = 0) -> HostPeak | None:
    """The host figures of a run on CUDA; None on another device (there the device's figure is host memory)."""
    if hardware.device != "cuda":
        return None
    return host_peak(host_inputs(info, config, precision, hardware, hf_config, offload_bytes))
