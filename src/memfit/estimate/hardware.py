"""The device an estimate plans for: the one named (its memory given, or read from this machine), or this machine's
default device."""

from __future__ import annotations

from memfit.errors import UserError
from memfit.estimate.memory import Hardware
from memfit.runtime import check_device
from memfit.units import GB


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
