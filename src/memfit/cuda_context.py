"""The CUDA context measured with NVML, for the estimate's runtime term on this machine.

What `nvidia-smi` shows for a process beyond the caching allocator's reserved blocks is the CUDA context: the driver's
per-process state, the loaded kernel modules, cuBLAS's handle. The estimator publishes a constant for it
(memfit.estimate: CUDA_CONTEXT_BYTES, 512 MiB), since it depends on the driver, the CUDA runtime, torch's lazy module
loading and the GPU. Where a GPU is present (`memfit system`, and `memfit train`/`probe` as their guard starts), this
module measures it once and records it in memfit's cache; estimates made on this machine afterwards use the
measured figure (`context_bytes`), and say so.

The measurement: NVML's device memory in use before this process touches CUDA, then CUDA initialised and one small
matmul run (so cuBLAS's handle and workspace exist, as they do in any training step), then NVML's figure for this
process (or, where NVML lists no processes, as in some containers, the device's in-use figure minus the one before),
minus what torch's caching allocator holds (`memory_reserved`): the rest is the context.

NVML comes from the optional `nvidia` extra (nvidia-ml-py, imported as pynvml). Without it, without a driver or
without a GPU nothing is measured and the published constant stays. The NVML reader is a parameter (`nvml`) so the
arithmetic and the recording are tested with a fake one; no measurement has run on a real GPU yet.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Protocol

CACHE_KIND = "cuda-context"


class NvmlReader(Protocol):
    """What the measurement reads from NVML, for the visible CUDA device `index` (CUDA_VISIBLE_DEVICES applied)."""

    def gpu_name(self, index: int) -> str: ...

    def device_used_bytes(self, index: int) -> int: ...

    def process_used_bytes(self, index: int, pid: int) -> int | None: ...


@dataclass(frozen=True)
class ContextMeasurement:
    context_bytes: int
    gpu_name: str
    method: str  # "process": NVML's figure for this process; "device": the device's in-use delta
    process_or_delta_bytes: int  # the NVML figure the context was taken from (per process, or the delta)
    reserved_bytes: int  # torch's caching allocator at the same moment (subtracted)
    torch_version: str
    measured_at: str

    def to_dict(self) -> dict:
        return asdict(self)


def context_from(nvml_bytes: int, reserved_bytes: int) -> int:
    """The context: what NVML counts for the process beyond the allocator's blocks (never negative: NVML rounds
    per-process figures to whole MiB, and a reading can race the allocator by a block)."""
    return max(0, nvml_bytes - reserved_bytes)


class PynvmlReader:
    """NvmlReader over pynvml; `open()` returns None without pynvml or a driver."""

    def __init__(self, pynvml) -> None:
        self._nvml = pynvml
        from memfit.system import _visible_indices

        self._visible = _visible_indices(pynvml.nvmlDeviceGetCount())

    @classmethod
    def open(cls) -> PynvmlReader | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            return cls(pynvml)
        except Exception:  # noqa: BLE001 - no pynvml, no driver, no GPU: nothing to measure
            return None

    def _handle(self, index: int):
        return self._nvml.nvmlDeviceGetHandleByIndex(self._visible[index])

    def gpu_name(self, index: int) -> str:
        name = self._nvml.nvmlDeviceGetName(self._handle(index))
        return name.decode() if isinstance(name, bytes) else str(name)

    def device_used_bytes(self, index: int) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle(index)).used)

    def process_used_bytes(self, index: int, pid: int) -> int | None:
        try:
            for process in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle(index)):
                if process.pid == pid and process.usedGpuMemory is not None:
                    return int(process.usedGpuMemory)
        except Exception:  # noqa: BLE001 - a container's hidden pids, an old driver: the device delta instead
            pass
        return None


def nvml_process_bytes(device_index: int = 0, pid: int | None = None) -> int | None:
    """Device memory NVML counts for one process (default: this one) on the visible CUDA device `device_index`:
    what `nvidia-smi` shows in its process list, the caching allocator's reserved blocks plus the CUDA context and
    library workspaces. None without pynvml (the `nvidia` extra: nvidia-ml-py), a driver, or the process listed."""
    reader = PynvmlReader.open()
    if reader is None:
        return None
    return reader.process_used_bytes(device_index, os.getpid() if pid is None else pid)


def _torch_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return "-"


def _start_cuda(index: int) -> int:
    """Initialise CUDA on device `index` the way training does (context, then cuBLAS through one matmul); returns
    the caching allocator's reserved bytes afterwards."""
    import torch

    device = torch.device("cuda", index)
    block = torch.ones(64, 64, device=device)
    (block @ block).sum().item()  # .item() waits for the kernel: the handle and workspace are in place
    del block
    return int(torch.cuda.memory_reserved(device))


def measure_context(index: int = 0, nvml: NvmlReader | None = None,
                    start_cuda: Callable[[int], int] = _start_cuda,
                    delta_ok: bool = True) -> ContextMeasurement | None:
    """Measure the CUDA context on visible device `index` (see the module docstring); None without NVML.
    `start_cuda(index)` initialises CUDA and returns torch's reserved bytes (a parameter for the tests).
    `delta_ok`: whether the device's in-use delta may stand in for the per-process figure; not when this process
    had started CUDA already (the "before" reading would hold its context) or other ranks start theirs on the
    machine at the same moment (it would hold theirs)."""
    nvml = nvml if nvml is not None else PynvmlReader.open()
    if nvml is None:
        return None
    try:
        before = nvml.device_used_bytes(index)
        reserved = start_cuda(index)
        process = nvml.process_used_bytes(index, os.getpid())
        if process is not None:
            method, figure = "process", process
        elif delta_ok:
            method, figure = "device", nvml.device_used_bytes(index) - before
        else:
            return None
        name = nvml.gpu_name(index)
    except Exception:  # noqa: BLE001 - a failed NVML call: no measurement, the published constant stays
        return None
    return ContextMeasurement(context_from(figure, reserved), name, method, figure, reserved, _torch_version(),
                              time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def _key() -> str:
    # The context depends on the driver, the CUDA runtime torch ships and how torch loads its modules: one
    # measurement per torch version on a machine (the cache is per machine). The GPU's name is recorded beside it.
    return hashlib.sha256(json.dumps(["cuda-context", _torch_version()]).encode()).hexdigest()[:32]


def record(measurement: ContextMeasurement) -> None:
    from memfit import cache

    cache.save(CACHE_KIND, _key(), measurement.to_dict())


def recorded() -> ContextMeasurement | None:
    """The measurement recorded on this machine for the installed torch, if any."""
    from memfit import cache

    data = cache.load(CACHE_KIND, _key())
    try:
        return ContextMeasurement(**data) if data else None
    except TypeError:  # a record of another shape (an older memfit)
        return None


def measure_and_record(index: int = 0, nvml: NvmlReader | None = None,
                       start_cuda: Callable[[int], int] = _start_cuda,
                       delta_ok: bool = True) -> ContextMeasurement | None:
    """measure_context, recorded for the estimates on this machine when it worked."""
    measurement = measure_context(index, nvml, start_cuda, delta_ok)
    if measurement is not None:
        record(measurement)
    return measurement


def context_bytes(published_bytes: int) -> tuple[int, str]:
    """The CUDA context for an estimate: this machine's measurement when one is recorded, else `published_bytes`
    (the estimator's constant); with where the figure comes from, for the estimate's notes."""
    measurement = recorded()
    if measurement is None:
        return published_bytes, "published constant (no NVML measurement on this machine)"
    return measurement.context_bytes, (f"measured with NVML on this machine ({measurement.gpu_name}, "
                                       f"torch {measurement.torch_version}, {measurement.measured_at})")
