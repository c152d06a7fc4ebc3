"""What hardware is here: RAM, swap, CPUs, CUDA GPUs (NVML where present, torch otherwise), MPS.

The suggested memory limit (80% of what is available, per device) is the guard's default and the estimator's
device memory when the user gives none.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field

import psutil

SUGGESTED_FRACTION = 0.8


@dataclass
class GpuInfo:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    source: str  # "nvml" or "torch"

    @property
    def suggested_limit_bytes(self) -> int:
        return int(self.free_bytes * SUGGESTED_FRACTION)


@dataclass
class SystemInfo:
    platform: str
    python: str
    torch: str
    cpu_count: int
    ram_total_bytes: int
    ram_available_bytes: int
    swap_total_bytes: int
    swap_used_bytes: int
    gpus: list[GpuInfo] = field(default_factory=list)
    mps_available: bool = False
    bf16_cpu: bool = False
    cgroup_limit_bytes: int | None = None  # this process's memory cgroup limit; ram_available_bytes stays under it

    @property
    def suggested_limit_bytes(self) -> int:
        return int(self.ram_available_bytes * SUGGESTED_FRACTION)

    def device_memory_bytes(self, device: str) -> int:
        """Memory the estimator may plan for on `device`: the suggested limit (80% of what is free there)."""
        if device == "cuda":
            if not self.gpus:
                return 0
            return min(gpu.suggested_limit_bytes for gpu in self.gpus)
        # CPU and MPS (unified memory) both draw from system RAM.
        return self.suggested_limit_bytes

    def default_device(self) -> str:
        if self.gpus:
            return "cuda"
        if self.mps_available:
            return "mps"
        return "cpu"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["suggested_limit_bytes"] = self.suggested_limit_bytes
        for gpu, gpu_dict in zip(self.gpus, data["gpus"]):
            gpu_dict["suggested_limit_bytes"] = gpu.suggested_limit_bytes
        data["default_device"] = self.default_device()
        return data


def _nvml_gpus() -> list[GpuInfo] | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, no device: NVML raises its own error types
        return None
    try:
        gpus = []
        visible = _visible_indices(pynvml.nvmlDeviceGetCount())
        for ordinal, physical in enumerate(visible):
            handle = pynvml.nvmlDeviceGetHandleByIndex(physical)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            gpus.append(GpuInfo(ordinal, name, int(memory.total), int(memory.free), "nvml"))
        return gpus
    finally:
        pynvml.nvmlShutdown()


def _visible_indices(count: int) -> list[int]:
    """Honour CUDA_VISIBLE_DEVICES when it is a plain list of indices (UUIDs fall back to all devices)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or visible.strip() == "":
        return list(range(count)) if visible is None else []
    try:
        return [int(part) for part in visible.split(",") if int(part) < count]
    except ValueError:
        return list(range(count))


def _torch_gpus() -> list[GpuInfo]:
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        gpus.append(GpuInfo(index, torch.cuda.get_device_name(index), int(total), int(free), "torch"))
    return gpus


def _cpu_supports_bf16() -> bool:
    """bf16 autocast runs on any CPU, but is only fast (and numerically native) with AVX512-BF16 or AMX."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return platform.machine() == "arm64" and platform.system() == "Darwin"
    return "avx512_bf16" in flags or "amx_bf16" in flags


def available_ram() -> tuple[int, int | None]:
    """Available system memory (MemAvailable), bounded by what this process's memory cgroup has left; and that
    cgroup's limit (None when there is none)."""
    from memfit.cgroup import cgroup_memory

    available = int(psutil.virtual_memory().available)
    cgroup = cgroup_memory()
    if cgroup is None:
        return available, None
    return min(available, cgroup.available_bytes), cgroup.limit_bytes


def detect() -> SystemInfo:
    import torch

    memory = psutil.virtual_memory()
    available, cgroup_limit = available_ram()
    swap = psutil.swap_memory()
    gpus = _nvml_gpus()
    if gpus is None:
        gpus = _torch_gpus()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return SystemInfo(
        platform=f"{platform.system()} {platform.release()} {platform.machine()}",
        python=platform.python_version(),
        torch=torch.__version__,
        cpu_count=os.cpu_count() or 1,
        ram_total_bytes=int(memory.total),
        ram_available_bytes=available,
        swap_total_bytes=int(swap.total),
        swap_used_bytes=int(swap.used),
        gpus=gpus,
        mps_available=mps,
        bf16_cpu=_cpu_supports_bf16(),
        cgroup_limit_bytes=cgroup_limit,
    )


def mapped_file_bytes() -> int | None:
    """This process's file-backed resident memory (shared libraries, mapped files): RssFile on Linux, else None.

    It counts in RSS but depends on the page cache: the same libraries map 1.5-1.9x more pages right after they
    were installed (fresh files sit in the cache in large folios) than once the cache has aged.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssFile:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
