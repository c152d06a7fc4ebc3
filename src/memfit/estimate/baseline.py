"""What a process holds when the model holds nothing: on CPU the Python+torch process (measured constants and this
machine's library pages), on CUDA the context and the caching allocator's slack, on MPS a fixed runtime."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

from memfit import cache
from memfit.config import TrainConfig
from memfit.estimate.hardware import Hardware
from memfit.units import MB

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
# Where a GPU and NVML are present, memfit measures it and this machine's estimates use that instead
# (memfit.cuda_context; `cuda_context_bytes` below); not yet run on a GPU. `benchmarks/estimate_accuracy.py --device
# cuda` compares.
CUDA_CONTEXT_BYTES = 512 * MB
MPS_RUNTIME_BYTES = 256 * MB
# The caching allocator rounds and fragments: reserved exceeds allocated by a few percent of what churns.
CUDA_ALLOCATOR_SLACK = 0.05


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


def runtime_bytes(hardware: Hardware, config: TrainConfig, dynamic_bytes: int) -> int:
    if hardware.device == "cuda":
        return cuda_context_bytes()[0] + int(CUDA_ALLOCATOR_SLACK * dynamic_bytes)
    if hardware.device == "mps":
        return MPS_RUNTIME_BYTES
    peft = 0
    if config.uses_adapters:
        peft = CPU_PEFT_IMPORT_BYTES - (CPU_BITSANDBYTES_IMPORT_BYTES if config.quant == "none" else 0)
    return CPU_PROCESS_ANON_BYTES + peft + cpu_file_pages_bytes()


def idle_process_bytes() -> int:
    """CPU: the process before PEFT is imported (what loading runs in): anonymous baseline + library pages."""
    return CPU_PROCESS_ANON_BYTES + cpu_file_pages_bytes()
