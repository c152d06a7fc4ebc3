"""The memory breakdown of one training configuration, per device, and the largest batch that fits.

Components (bytes per device):
- weights: every parameter at the dtype it is stored in (trained params at the trainable dtype; a frozen LoRA base
  at the compute dtype; a 4-bit base at 0.5 byte/weight plus nf4 block constants, an 8-bit one at a byte, with the
  embeddings, norms and lm_head in the compute dtype, or fp32 under `--qlora-upcast`: `unquantized_bytes`);
- adapters: LoRA A/B matrices (fp32 under mixed precision, as PEFT keeps them);
- gradients: one per trained parameter, in its dtype;
- optimizer: states by optimizer and dtype (AdamW m+v, 8-bit blockwise states, Adafactor's factored moments),
  plus the fp32 master copy where the engine keeps one apart from the weights (DeepSpeed ZeRO);
- activations, logits: the peak of one traced micro-step (memfit.estimate.trace), on cuts of the real
  architecture extrapolated per decoder layer;
- runtime: the process baseline on CPU, the CUDA context and allocator slack on CUDA.

Traces are kept on disk (memfit.cache): a second estimate of the same model and settings runs no trace,
and one from a cached resolution (`memfit estimate`, `recommend`) imports neither torch nor transformers. The
largest batch is solved on lines through the traces at batch 1 and 2 and checked by the traced estimate at the
answer (`solve_max_batch`).

Where each part lives: dtypes (`--dtype` by name), terms (weights, adapters, gradients, optimizer states, sharded
and offloaded), cuts (the traced step: cuts, their cache, the lines), baseline (the runtime term and its measured
constants), loading (the loading peak), breakdown (`Estimate`, `estimate_memory`, `to_json`), batch
(`solve_max_batch`). This module names them all in one place, for the callers; a test that replaces a function
replaces it in the module that calls it.
"""

from __future__ import annotations

from memfit.estimate.baseline import (
    CPU_BITSANDBYTES_IMPORT_BYTES,
    CPU_FILE_PAGES_FALLBACK_BYTES,
    CPU_FILE_PAGES_RATIO,
    CPU_PEFT_IMPORT_BYTES,
    CPU_PROCESS_ANON_BYTES,
    CUDA_ALLOCATOR_SLACK,
    CUDA_CONTEXT_BYTES,
    MPS_RUNTIME_BYTES,
    cpu_file_pages_bytes,
    runtime_bytes,
)
from memfit.estimate.batch import BatchSolve, grad_accum_for, max_batch_size, solve_max_batch
from memfit.estimate.breakdown import Estimate, estimate_memory, to_json
from memfit.estimate.cuts import (
    _TRACE_CACHE,
    NOT_TRACED,
    TRACE_STATS,
    cut_lines,
    cuts_of,
    layer_period,
    lines_hold_to,
    traced_peaks,
)
from memfit.estimate.dtypes import Precision, resolve_dtypes, traced_precision
from memfit.estimate.hardware import Hardware
from memfit.estimate.loading import checkpoint_dtype_bytes, load_peak_bytes, mapped_expert_file_bytes
from memfit.estimate.terms import (
    ZERO3_GATHERED_LAYERS,
    kbit_layout_note,
    optimizer_state_bytes,
    trainable_shapes,
    unquantized_bytes,
    weight_bytes,
)
from memfit.models.arch import arch_info
from memfit.units import GB, MB

__all__ = [
    "CPU_BITSANDBYTES_IMPORT_BYTES", "CPU_FILE_PAGES_FALLBACK_BYTES", "CPU_FILE_PAGES_RATIO", "CPU_PEFT_IMPORT_BYTES",
    "CPU_PROCESS_ANON_BYTES", "CUDA_ALLOCATOR_SLACK", "CUDA_CONTEXT_BYTES", "GB", "MB", "MPS_RUNTIME_BYTES",
    "NOT_TRACED", "TRACE_STATS", "ZERO3_GATHERED_LAYERS", "_TRACE_CACHE", "BatchSolve", "Estimate", "Hardware",
    "Precision", "arch_info", "checkpoint_dtype_bytes", "cpu_file_pages_bytes", "cut_lines", "cuts_of",
    "estimate_memory", "grad_accum_for", "kbit_layout_note", "layer_period", "lines_hold_to", "load_peak_bytes",
    "mapped_expert_file_bytes", "max_batch_size", "optimizer_state_bytes", "resolve_dtypes", "runtime_bytes",
    "solve_max_batch", "to_json", "trainable_shapes", "traced_peaks", "traced_precision", "unquantized_bytes",
    "weight_bytes",
]
