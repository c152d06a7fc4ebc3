"""MLX's memory: its counters as a guard reading, and its limits set from the guard's limit.

A reading (`read_mlx_memory`) is memfit's `MemorySample` (process RSS and its high-water mark, system available)
with MLX's own counters added: active (bytes in live arrays), peak (their high-water mark since the last reset)
and cache (freed buffers MLX keeps for reuse). It has the reader signature the guard takes (`Guard(limit,
reader=read_mlx_memory)`), so the torch engine's policy (threshold, stop at the limit, early stop, leaks) runs on
MLX unchanged.

What the guard compares with the limit (`watched_bytes`) is the larger of the RSS and MLX's active + cache. On a
Linux CPU MLX's buffers are ordinary heap memory inside the RSS, so the RSS is the figure (it also counts the
interpreter and libraries, as on the torch engine's CPU path). On Apple Silicon MLX's buffers are Metal buffers in
unified memory that the RSS need not show; MLX's own counters are then the figure, and they are what
`mx.set_memory_limit` is measured against.

Limits (`apply_limits`): MLX's memory limit is set to what its arrays may hold before the guard's warning threshold
(`arrays_limit_bytes`). The seeds set it to the whole limit (`--max-memory 70`: "Set MLX memory limit to 70.0 GB"),
but MLX's limit does not cap the arrays: it is where MLX's eval stops allocating ahead. MLX allocates each op's
output when it schedules the op, up to 10 ops ahead of those running (mlx/transforms.cpp, MAX_ACTIVE_TASKS), and only
while its active memory is over the limit does it wait for running ops first (relaxed: past the last one it
allocates anyway). What it ran ahead added 14% to 290% to the activations of benchmarks/derive_mlx_constants.py's
runs (docs/mlx.md), so at the guard's whole limit a step whose need fits could be stopped by what MLX ran ahead;
below the threshold MLX waits instead, and the guard's stop is left for what the step really needs, at no cost in
speed where the limit sits above the need (benchmarks/mlx_memory_limit.py). The cache limit is set to the part of the
limit above the warning threshold, so freed buffers MLX keeps can never by themselves reach the threshold, or MLX's
own when that is lower (its CPU build's 32 MB); on Metal the wired limit to the limit, at most the device's recommended working-set size (what mlx-lm's
trainer sets). Each setter returns the previous value, and the returned `MlxLimits` says what was set and what it
was before.

Bounded run-ahead (`need_bytes`): below the guard's threshold, MLX's own run-ahead is still free to add what it
likes (the tiny model, LoRA, 4 x 256 fp32 checkpointed: a need of 33.6 MB, 51.7 MB held with no limit; with a 70 GB
limit it may run 56 GB ahead). The trainer passes the estimate's step need (memfit.estimate.mlx_memory's `mlx_peak_bytes`), and
MLX's limit is lowered to RUN_AHEAD_HEADROOM times it where that is below the threshold's share: MLX then waits for
running ops once the arrays pass it. RUN_AHEAD_HEADROOM is 1.25: the need is at most 1.14x the estimate in every run
benchmarks/derive_mlx_constants.py records (its worst under-estimate, 11.9% of the need, since the refit of
2026-12-06 that counts the adapters' fp32 inputs; 1.20x before), and below the need
MLX would wait before every op (1.3-1.9x the step's time, benchmarks/mlx_memory_limit.py's 1-byte row); at +25% of
the need that benchmark's step ran at the unconstrained speed (0.95-1.18x per round, 16-21 s steps, on a CPU;
unmeasured on Metal).
"""

from __future__ import annotations

import os

from dataclasses import dataclass, replace

import mlx.core as mx

from memfit.guard.sampler import MemorySample, read_memory
from memfit.units import format_gb


def _counter(name: str):
    """mx.NAME (MLX >= 0.25) or mx.metal.NAME (older releases, Metal builds only); None when neither exists."""
    function = getattr(mx, name, None)
    if function is None:
        metal = getattr(mx, "metal", None)
        function = getattr(metal, name, None) if metal is not None else None
    return function


_active, _peak, _cache = _counter("get_active_memory"), _counter("get_peak_memory"), _counter("get_cache_memory")
_reset_peak = _counter("reset_peak_memory")
_clear_cache = _counter("clear_cache")


def metal() -> bool:
    """Whether MLX runs on a Metal GPU here (False on a Linux CPU build)."""
    try:
        return bool(mx.metal.is_available())
    except Exception:  # noqa: BLE001 - a CPU-only build without the metal module
        return False


def device_name() -> str:
    return "mlx-gpu" if metal() else "mlx-cpu"


@dataclass(frozen=True)
class MlxMemorySample(MemorySample):
    """A guard reading with MLX's counters (bytes)."""

    mlx_active_bytes: int | None = None
    mlx_peak_bytes: int | None = None  # high-water mark of mlx_active_bytes since the process began (or a reset)
    mlx_cache_bytes: int | None = None

    @property
    def mlx_bytes(self) -> int:
        return (self.mlx_active_bytes or 0) + (self.mlx_cache_bytes or 0)

    @property
    def watched_bytes(self) -> int:
        return max(self.rss_bytes, self.mlx_bytes)

    @property
    def watched_high_water_bytes(self) -> int:
        return max(self.peak_rss_bytes, (self.mlx_peak_bytes or 0) + (self.mlx_cache_bytes or 0))


def mlx_counters() -> dict[str, int | None]:
    return {"mlx_active_bytes": int(_active()) if _active else None,
            "mlx_peak_bytes": int(_peak()) if _peak else None,
            "mlx_cache_bytes": int(_cache()) if _cache else None}


def read_mlx_memory(device: str = "mlx") -> MlxMemorySample:
    """One reading: the process and system figures of memfit.guard.read_memory, and MLX's counters. `device` is
    there for the guard's reader signature (MLX has one memory pool)."""
    base = read_memory("cpu")
    return MlxMemorySample(time=base.time, rss_bytes=base.rss_bytes, peak_rss_bytes=base.peak_rss_bytes,
                           system_available_bytes=base.system_available_bytes, **mlx_counters())


def peak_bytes() -> int | None:
    """MLX's peak counter (`mx.get_peak_memory()`): the most bytes its arrays held at once since the last reset."""
    return int(_peak()) if _peak is not None else None


def reset_peak() -> None:
    if _reset_peak is not None:
        _reset_peak()


def clear_cache() -> None:
    """Give MLX's cached buffers back (the guard's threshold and the checkpoint before a stop call this)."""
    if _clear_cache is not None:
        _clear_cache()


@dataclass(frozen=True)
class MlxLimits:
    memory_limit_bytes: int
    previous_memory_limit_bytes: int
    cache_limit_bytes: int
    previous_cache_limit_bytes: int
    wired_limit_bytes: int | None  # None: not set (no Metal, or this MLX has no set_wired_limit)
    previous_wired_limit_bytes: int | None
    read_back_bytes: int | None = None  # MLX's memory limit read back after setting it
    guard_limit_bytes: int = 0  # the guard's limit the others come from
    threshold: float = 0.8
    outside_bytes: int = 0  # what the guard's figure held beside MLX's arrays when they were set
    need_bytes: int | None = None  # the estimated need the run-ahead bound came from (None: not bounded)
    bounded: bool = False  # the memory limit is RUN_AHEAD_HEADROOM x need_bytes, below the threshold's share
    share_bytes: int = 0  # the threshold's share (arrays_limit_bytes): the memory limit when not bounded
    need_seen: bool = False  # need_bytes is the first step's peak (rebound_if_missed), not the estimate

    def describe(self) -> str:
        if self.bounded:
            need = "the first step's peak" if self.need_seen else "the step's estimated need"
            why = (f"{RUN_AHEAD_HEADROOM:g}x {need} of {format_gb(self.need_bytes or 0)}, below "
                   f"{self.threshold:.0%} of the {format_gb(self.guard_limit_bytes)} limit")
        else:
            why = (f"{self.threshold:.0%} of the {format_gb(self.guard_limit_bytes)} limit"
                   + (f" less {format_gb(self.outside_bytes)} outside MLX's arrays" if self.outside_bytes else ""))
        text = (f"Set MLX memory limit to {format_gb(self.memory_limit_bytes)} (was "
                f"{format_gb(self.previous_memory_limit_bytes)}): {why}, above which MLX waits for running ops "
                f"instead of allocating ahead; cache limit {format_gb(self.cache_limit_bytes)}")
        if self.wired_limit_bytes is not None:
            text += f"; wired limit {format_gb(self.wired_limit_bytes)}"
        return text


def _setter(name: str):
    function = getattr(mx, name, None)
    if function is None:
        metal_module = getattr(mx, "metal", None)
        function = getattr(metal_module, name, None) if metal_module is not None else None
    return function


def recommended_working_set_bytes() -> int | None:
    """What macOS lets the GPU keep wired (Metal's recommendedMaxWorkingSetSize); None without Metal."""
    if not metal():
        return None
    try:
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        return int(info["max_recommended_working_set_size"])
    except Exception:  # noqa: BLE001
        return None


def arrays_limit_bytes(limit_bytes: int, threshold: float, outside_bytes: int) -> int:
    """MLX's memory limit for a guard limit: the warning threshold's share of it, less what the guard's figure holds
    outside MLX's arrays (`outside_bytes`: on a CPU the process's RSS beside MLX's buffers, the interpreter and
    libraries; 0 on Metal, where the guard compares MLX's own counters). At least 1 byte: a limit the process
    outside the arrays already fills makes MLX wait for every op, the least it can hold."""
    return max(1, int(limit_bytes * threshold) - int(outside_bytes))


def outside_arrays_bytes() -> int:
    """What the guard's figure holds beside MLX's arrays now: on a CPU the RSS less MLX's active and cached buffers
    (MLX's buffers are malloc's, inside the RSS); 0 on Metal (its buffers are not in the RSS the guard compares)."""
    if metal():
        return 0
    sample = read_mlx_memory()
    return max(0, sample.rss_bytes - sample.mlx_bytes)


RUN_AHEAD_HEADROOM = 1.25  # the module's docstring, "Bounded run-ahead", says where 1.25 comes from


def run_ahead_bound_bytes(need_bytes: int) -> int:
    """MLX's memory limit that bounds its run-ahead for a step estimated to need `need_bytes` of MLX arrays."""
    return int(need_bytes * RUN_AHEAD_HEADROOM)


def apply_limits(limit_bytes: int, threshold: float = 0.8, need_bytes: int | None = None) -> MlxLimits:
    """Set MLX's memory, cache and (Metal) wired limits from the guard's limit, and with `need_bytes` (the
    estimated need of the run's step) bound MLX's run-ahead below it; returns what was set."""
    set_memory, set_cache = _setter("set_memory_limit"), _setter("set_cache_limit")
    limit_bytes = int(limit_bytes)
    outside = outside_arrays_bytes()
    arrays_limit = arrays_limit_bytes(limit_bytes, threshold, outside)
    share = arrays_limit
    bounded = bool(need_bytes) and run_ahead_bound_bytes(need_bytes) < arrays_limit
    if bounded:
        arrays_limit = run_ahead_bound_bytes(need_bytes)
    previous_memory = int(set_memory(arrays_limit))
    # Lower the cache limit to the part of the limit above the threshold, never raise it: MLX's CPU build keeps up
    # to 32 MB of freed buffers by default and gives none back under pressure (mlx/backend/no_gpu/allocator.cpp has
    # no gc limit, unlike Metal's allocator), so a raised limit is that much more resident memory for nothing.
    wanted_cache = max(0, int(limit_bytes * (1.0 - threshold)))
    previous_cache = int(set_cache(wanted_cache))
    cache_bytes = min(wanted_cache, previous_cache)
    if cache_bytes != wanted_cache:
        set_cache(cache_bytes)
    wired, previous_wired = None, None
    set_wired = _setter("set_wired_limit")
    working_set = recommended_working_set_bytes()
    if set_wired is not None and working_set is not None:
        wired = min(limit_bytes, working_set)
        previous_wired = int(set_wired(wired))
    return MlxLimits(arrays_limit, previous_memory, cache_bytes, previous_cache, wired, previous_wired,
                     memory_limit_bytes(), limit_bytes, threshold, outside, need_bytes, bounded, share)


# A first step's peak above the bound by more than this share says the estimate missed the need. At or above the need
# MLX passes the bound by what it had in flight when it crossed it (up to 10 ops' outputs: the tiny model at 4 x 256
# fp32, a 44.5 MB bound, 51.7 MB, +16%: run.json's `peak_mlx_bytes` and `mlx_limits` of `memfit train --engine mlx
# --model tiny --data ROWS -o run --max-steps 4 --lora-rank 16 --lora-alpha 32 --batch-size 4 --seq-len 256
# --no-packing --max-grad-norm 0` on benchmarks/mlx_vs_mlx_lm.py's full rows, at 524e975); below the need, by all
# that the step needs beyond it.
MISSED_BY = RUN_AHEAD_HEADROOM - 1


def rebound_if_missed(limits: MlxLimits, peak_bytes: int) -> MlxLimits | None:
    """After the first step: where its MLX peak passed the run-ahead bound by more than MISSED_BY, the estimate was
    below the step's need and MLX waited before every op past the bound (benchmarks/mlx_memory_limit.py's 1-byte
    rows: up to 1.9x the step's time). The bound is then set from the peak seen (RUN_AHEAD_HEADROOM x it, at most the
    threshold's share) and the new limits are returned; else None."""
    if not limits.bounded or peak_bytes <= limits.memory_limit_bytes * (1 + MISSED_BY):
        return None
    bound = min(limits.share_bytes, run_ahead_bound_bytes(peak_bytes))
    _setter("set_memory_limit")(bound)
    return replace(limits, memory_limit_bytes=bound, read_back_bytes=memory_limit_bytes(), need_bytes=int(peak_bytes),
                   need_seen=True, bounded=bound < limits.share_bytes)


# MLX's evaluation order: mlx/transforms.cpp builds the order it runs a graph in breadth first from the outputs, up
# to MLX_BFS_MAX_WIDTH arrays a level (20 unless set); at width 1 it is depth first. Depth first, a checkpointed step
# of a deep, narrow model needs much less (a 6-layer llama of hidden 128 at 64 x 256 bf16: 252.4 against 404.5 MB)
# and a head-heavy one with the chunked loss more (derive_mlx_constants.py's shape e, vocabulary 16,384, hidden 128,
# at 64 x 256 fp32: 581.4 against 446.7 MB): docs/mlx.md, "The order of evaluation". memfit keeps MLX's default,
# which the estimate is fitted in, and sets it explicitly so that every MLX process of a run evaluates in the same
# order; MLX_BFS_MAX_WIDTH=1 in the environment opts in to depth first.
EVAL_WIDTH_VARIABLE = "MLX_BFS_MAX_WIDTH"
EVAL_WIDTH = 20


def set_eval_width(width: int = EVAL_WIDTH) -> str:
    """Ask MLX for `width` unless MLX_BFS_MAX_WIDTH is set already (the user's choice stands); returns the value in
    force. MLX reads the variable once, at its first evaluation in the process: the engine calls this before its
    first (a library caller who evaluated MLX arrays before keeps MLX's order of then)."""
    return os.environ.setdefault(EVAL_WIDTH_VARIABLE, str(width))


def restore_limits(limits: MlxLimits) -> None:
    """Put back the limits `apply_limits` replaced (a library caller's process keeps its own settings)."""
    _setter("set_memory_limit")(limits.previous_memory_limit_bytes)
    _setter("set_cache_limit")(limits.previous_cache_limit_bytes)
    if limits.previous_wired_limit_bytes is not None:
        _setter("set_wired_limit")(limits.previous_wired_limit_bytes)


def memory_limit_bytes() -> int:
    """MLX's memory limit now (what `apply_limits` set, read back)."""
    getter = _counter("get_memory_limit")
    if getter is not None:
        return int(getter())
    # Older MLX has no getter: setting returns the previous value, which is put back at once.
    setter = _setter("set_memory_limit")
    value = int(setter(0))
    setter(value)
    return value


def report_lines(sample: MlxMemorySample) -> str:
    """MLX's counters as lines to add under memfit's memory report box."""
    rows = [("MLX active:", sample.mlx_active_bytes), ("MLX peak:", sample.mlx_peak_bytes),
            ("MLX cache:", sample.mlx_cache_bytes)]
    return "\n".join(f"  {label:<19}{format_gb(value)}" for label, value in rows if value is not None)
