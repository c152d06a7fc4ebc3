"""The seeds' "which model for my RAM" table, computed by the estimator rather than typed in."""

from __future__ import annotations

from typing import Any, Callable

from memfit.cache import CacheMiss
from memfit.config import TrainConfig
from memfit.estimate.memory import Hardware, estimate_memory, max_batch_size
from memfit.estimate.resolution_cache import builtin_config
from memfit.models.registry import ARCHITECTURES

# One architecture per size class, smallest to largest.
SIZES = ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "qwen2.5-14b", "llama-3.1-70b")
METHODS = ("full", "lora", "qlora")


def recommend(config: TrainConfig, hardware: Hardware, methods: tuple[str, ...] = METHODS) -> dict[str, Any]:
    """Every size and each of `methods`: the estimate at the configured batch and the largest batch that fits.
    The method asked for keeps its --quant (lora with --quant 8); the others take theirs (qlora 4-bit, else
    none). From cached traces when they are all there (no torch or transformers import), else traced (and
    cached)."""
    return sizes_table(config, hardware, methods, estimate_memory, max_batch_size)


def sizes_table(config: TrainConfig, hardware: Hardware, methods: tuple[str, ...], estimate: Callable,
                max_batch: Callable) -> dict[str, Any]:
    """`recommend`'s table from one engine's `estimate` and `max_batch` (the MLX engine's: see
    memfit.estimate.mlx_memory.recommend_mac)."""
    try:
        return _recommend(config, hardware, methods, estimate, max_batch, real=False)
    except CacheMiss:
        return _recommend(config, hardware, methods, estimate, max_batch, real=True)


def _recommend(config: TrainConfig, hardware: Hardware, methods: tuple[str, ...], estimate: Callable,
               max_batch: Callable, real: bool) -> dict[str, Any]:
    rows = []
    largest: dict[str, str | None] = {method: None for method in methods}
    precision = None
    for name in SIZES:
        arch = ARCHITECTURES[name]
        hf_config = builtin_config(arch, real=real)
        row = {"model": name, "size": arch.size_label, "params": arch.param_count, "methods": {}}
        for method in methods:
            quant = config.quant if method == config.method else ("4" if method == "qlora" else "none")
            method_config = config.updated(method=method, quant=quant)
            result = estimate(hf_config, method_config, hardware, model_name=name)
            precision = result.precision
            fits = result.fits
            row["methods"][method] = {
                "fits": fits,
                "total_bytes": result.total_bytes,
                "max_batch_size": max_batch(hf_config, method_config, hardware) if fits else 0,
            }
            if fits:
                largest[method] = name
        rows.append(row)
    return {"device": hardware.device, "memory_bytes": hardware.memory_bytes, "precision": precision,
            "seq_len": config.seq_len, "batch_size": config.batch_size,
            "grad_checkpointing": config.grad_checkpointing, "methods": list(methods), "models": rows, "largest": largest}
