"""The memory guard: read memory (a background thread), decide (limit, threshold, early stop, leaks), report."""

from memfit.guard.oom import is_out_of_memory
from memfit.guard.policy import (
    Guard,
    GuardEvent,
    HostLimit,
    LeakFit,
    MemoryLimit,
    choose_host_limit,
    choose_limit,
    configure_cuda,
    cuda_alloc_conf_env,
    fit_leak,
    release_memory,
    watches_host,
)
from memfit.guard.report import memory_report
from memfit.units import format_gb
from memfit.guard.sampler import MemorySample, MemorySampler, read_memory

__all__ = [
    "Guard",
    "GuardEvent",
    "HostLimit",
    "LeakFit",
    "MemoryLimit",
    "MemorySample",
    "MemorySampler",
    "choose_host_limit",
    "choose_limit",
    "configure_cuda",
    "cuda_alloc_conf_env",
    "fit_leak",
    "format_gb",
    "is_out_of_memory",
    "memory_report",
    "read_memory",
    "release_memory",
    "watches_host",
]
