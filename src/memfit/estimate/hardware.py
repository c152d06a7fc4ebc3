"""The device an estimate plans for: the one named (its memory given, or read from this machine), or this machine's
default device."""

from __future__ import annotations

from dataclasses import dataclass

from memfit.errors import UserError
from memfit.runtime import check_device
from memfit.units import GB


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


def planned_hardware(device: str | None, memory_gb: float | None, num_gpus: int = 1, zero: int = 0,
                     offload: str = "none", engine: str = "deepspeed") -> Hardware:
    """`Hardware` from the options of `memfit estimate` / `recommend` (each checked: a UserError names the flag)."""
    from memfit.system import detect

    if memory_gb is not None and memory_gb <= 0:
        raise UserError(f"--memory-gb must be > 0 (got {memory_gb})", hint="give the device memory in GB")
    if num_gpus < 1:
        raise UserError(f"--num-gpus must be >= 1 (got {num_gpus})")
    if zero not in (0, 1, 2, 3):
        raise UserError(f"--zero must be 0, 1, 2 or 3 (got {zero})")
    if offload not in ("none", "cpu"):
        raise UserError(f"unknown --offload {offload!r}: choose none or cpu")
    info = None
    if device is None:
        info = detect()
        device = info.default_device()
    check_device(device)
    if memory_gb is not None:
        memory = int(memory_gb * GB)
    else:
        info = info or detect()
        memory = info.device_memory_bytes(device)
        if memory == 0:
            raise UserError(f"no {device} device on this machine to size the estimate for",
                            hint="pass --memory-gb G (the memory of the target device)")
    return Hardware(device, memory, num_gpus, zero, offload, engine=engine)
