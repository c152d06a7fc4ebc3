"""Is this exception an out-of-memory error? The trainer answers differently (save what it can, exit 4)."""

from __future__ import annotations

import sys

# Messages of allocation failures that arrive as a plain RuntimeError: the CPU allocator, the CUDA/HIP/XPU/MPS
# caching allocators (older torch, or paths that do not raise OutOfMemoryError), and cuBLAS/cuDNN failing to get
# their workspace. Matched case-insensitively.
OOM_MESSAGES = (
    "defaultcpuallocator: can't allocate memory",
    "cuda out of memory",
    "mps backend out of memory",
    "out of memory",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
)
_MAX_CAUSES = 8


def is_out_of_memory(error: BaseException) -> bool:
    """True for torch.OutOfMemoryError, MemoryError and allocation-failure RuntimeErrors, also when one is the
    explicit cause (`raise ... from oom`) of the error raised."""
    for _ in range(_MAX_CAUSES):
        if error is None:
            return False
        if _is_oom(error):
            return True
        error = error.__cause__
    return False


def _is_oom(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")  # an OOM from torch means torch is imported already
    if torch is not None:
        oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
        if oom_type is not None and isinstance(error, oom_type):
            return True
    if isinstance(error, RuntimeError):
        message = str(error).lower()
        return any(pattern in message for pattern in OOM_MESSAGES)
    return False
