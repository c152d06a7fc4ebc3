"""The MLX engine: memfit's training on Apple's MLX through mlx-lm's pieces (Apple Silicon natively, and Linux CPUs
with `mlx[cpu]`, which is how it is tested here).

What it owns is what differs from torch: loading (`mlx_lm.utils.load_model`), quantizing the base (`--quant 4|8`),
the adapters (`linear_to_lora_layers`, LoRA or DoRA), `mlx.optimizers` with memfit's schedule, the step
(`nn.value_and_grad`, accumulation, clipping, mlx-lm's gradient checkpointing), MLX's memory counters and limits, and
the adapter files (mlx-lm's format in `final/`, a PEFT export in `final/peft/`). What it shares with torch:
TrainConfig, the data pipeline (tokenisation, masking, packing, the row order), the step objective (CE and distrust
weights), the guard's policy, events, the run directory, the checkpoint format's atomic and checksummed writes.

Nothing here is imported by memfit unless the MLX engine is asked for: `import memfit` works without mlx.
"""

from __future__ import annotations

import importlib.util
import platform
import sys


def available() -> bool:
    """Whether mlx and mlx-lm are importable (without importing them)."""
    try:
        return importlib.util.find_spec("mlx.core") is not None and importlib.util.find_spec("mlx_lm") is not None
    except (ImportError, ValueError):
        return False


def apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def choose_engine(engine: str, needs_mlx: bool = True) -> str:
    """`--engine torch|mlx|auto` -> torch or mlx. auto: MLX on Apple Silicon when it is installed, torch elsewhere.
    `needs_mlx` False: mlx is a valid answer without MLX installed (the MLX estimate is arithmetic)."""
    from memfit.errors import UserError

    if engine == "auto":
        return "mlx" if apple_silicon() and available() else "torch"
    if engine == "mlx" and needs_mlx and not available():
        raise UserError("--engine mlx needs mlx and mlx-lm", hint="pip install 'memfit[mlx]'")
    if engine not in ("torch", "mlx"):
        raise UserError(f"unknown --engine {engine!r}", hint="choose torch, mlx or auto")
    return engine


def train_mlx(*args, **kwargs):
    """memfit.mlx.trainer.train_mlx (imported on call: mlx is loaded only when the engine is used)."""
    from memfit.mlx.trainer import train_mlx as run

    return run(*args, **kwargs)


__all__ = ["apple_silicon", "available", "choose_engine", "train_mlx"]
