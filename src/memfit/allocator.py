"""Make process RSS follow the memory tensors really hold (glibc only), without a page fault per tensor.

glibc serves large blocks with mmap and gives them back on free, but its mmap threshold is *dynamic*: each freed
mmapped block raises it, up to 32 MiB. After the first training step most activations then come from the heap,
which keeps freed memory: RSS stays at the step's peak forever (measured: 2.2 GB of RSS for 0.7 GB of live tensors
between steps). The guard watches RSS, so a hoarding heap means false alarms and less room.

Two ways out, each a policy here (`MEMFIT_MALLOC` picks one, for benchmarks/allocator_policies.py):
- "threshold": fix the mmap threshold at 1 MiB (mallopt M_MMAP_THRESHOLD, which also turns the dynamic adjustment
  off). Every block above it is returned to the OS when freed, and is a fresh mmap when allocated again: page
  faults and zeroing for every large tensor of every step.
- "trim": leave glibc's dynamic threshold alone, so blocks freed within a step are reused from the heap, and call
  `malloc_trim(0)` at the step end, which returns every free heap page to the OS (the top by sbrk, the rest by
  madvise). RSS falls back to the live tensors between steps; within a step it follows the heap's high-water mark.
- "none": glibc as it comes (the hoarding case above), for comparison only.
`step_end()` is the safe point: nothing of the step is live but what it keeps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from dataclasses import dataclass

from memfit.errors import UserError

M_MMAP_THRESHOLD = -3
DEFAULT_MMAP_THRESHOLD_BYTES = 1 << 20
POLICIES = ("trim", "threshold", "none")
# Chosen by `python benchmarks/allocator_policies.py ... --write` (docs/benchmarks.md, "How the CPU allocator gives
# memory back"; 30-layer smollm2-135m LoRA, batch 4 x 256, 3 alternating repeats at load 0.0): "trim" ran 1.13-1.27x
# the tokens/s of "threshold" (273-289 against 228-242) with a lower step-end RSS (1,080 against 1,338 MB), but its
# peak, the figure a run dies of, was 28-32% higher (3,524-3,609 against 2,715-2,758 MB; 2,948-3,609 over the day's
# runs: heap holes left by the backward pass, not cured by a second trim before it). memfit promises a peak the
# estimate predicts and the guard can hold, so "threshold" stays the default; MEMFIT_MALLOC=trim is the documented
# choice for speed when there is room.
DEFAULT_POLICY = "threshold"
POLICY_ENV = "MEMFIT_MALLOC"


@functools.cache  # trim() runs at every step end under "trim": load the library once
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def fix_mmap_threshold(threshold_bytes: int = DEFAULT_MMAP_THRESHOLD_BYTES) -> bool:
    """Set glibc's mmap threshold for this process; False where the C library is not glibc."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)) == 1


def trim() -> bool:
    """Return the heap's free pages to the OS (glibc's malloc_trim(0)); False where there is no malloc_trim."""
    malloc_trim = getattr(_libc(), "malloc_trim", None)
    if malloc_trim is None:
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    malloc_trim(0)
    return True


@dataclass(frozen=True)
class Allocator:
    """The policy in force: what `configure` set up, and what to do at each step end."""

    policy: str
    effective: bool  # False off glibc: then nothing was set and step_end does nothing

    def step_end(self) -> None:
        if self.effective and self.policy == "trim":
            trim()

    def describe(self) -> str:
        if not self.effective:
            return f"allocator: {self.policy} policy not applied (the C library is not glibc)"
        return {"trim": "allocator: glibc heap, trimmed at each step end (RSS follows live tensors between steps)",
                "threshold": "allocator: glibc mmap threshold fixed at 1 MiB (large tensors go back when freed)",
                "none": "allocator: glibc as it comes (freed memory stays in the heap)"}[self.policy]


def chosen_policy(policy: str | None = None) -> str:
    """`policy`, else $MEMFIT_MALLOC, else DEFAULT_POLICY; a name that is no policy is one line (UserError)."""
    policy = policy or os.environ.get(POLICY_ENV) or DEFAULT_POLICY
    if policy not in POLICIES:
        raise UserError(f"{POLICY_ENV}={policy!r} is not an allocator policy", hint=f"use one of {', '.join(POLICIES)}")
    return policy


def configure(policy: str | None = None) -> Allocator:
    """Set up this process's allocator: `policy`, else $MEMFIT_MALLOC, else DEFAULT_POLICY."""
    policy = chosen_policy(policy)
    if policy == "threshold":
        return Allocator(policy, fix_mmap_threshold())
    return Allocator(policy, hasattr(_libc(), "malloc_trim"))  # hasattr(None, ...) is False: not glibc
