"""Checkpoints of the MLX engine, in memfit's checkpoint format and through its writer (memfit.train.checkpoint):
the same temporary-name-then-rename write, checksums in meta.json, replacement of a same-step copy, pruning, disk-full
handling, and the same readers (`open_checkpoint`, `latest_checkpoint`, `verify_checkpoint`).

What goes in the files:
- `trainable.safetensors`: the trainable arrays under the model's own paths (`model.layers.0.self_attn.q_proj.lora_a`);
- `optimizer.pt`: the mlx.optimizers state flattened ({"format": "mlx", "tensors": {path: tensor}, "dtypes":
  {path: MLX dtype}}): step count, learning rate, and each parameter's moments;
- `scheduler.pt`: the schedule's position (the learning rate is a function of the optimizer's step count);
- `rng.json`: Python, numpy and torch RNG states (memfit's writer); `trainer_state.json` carries MLX's RNG key
  (`mlx_rng`: dropout draws from it) with the data position.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import torch
from mlx.utils import tree_flatten, tree_unflatten

from memfit.errors import UserError
from memfit.train import checkpoint as ckpt

_TORCH = {"float32": torch.float32, "float16": torch.float16, "int32": torch.int32, "int64": torch.int64,
          "uint32": torch.int64, "uint64": torch.int64, "bool": torch.bool, "bfloat16": torch.bfloat16}


def _dtype_name(array: mx.array) -> str:
    return str(array.dtype).rsplit(".", 1)[-1]


def to_torch(array: mx.array) -> torch.Tensor:
    """An MLX array as a torch tensor of the same values (bf16 through fp32, unsigned ints as int64: exact)."""
    name = _dtype_name(array)
    if name == "bfloat16":
        return torch.from_numpy(np.array(array.astype(mx.float32))).to(torch.bfloat16).contiguous()
    values = np.array(array, copy=True)  # its own contiguous buffer, 0-d kept 0-d (ascontiguousarray makes it 1-d)
    if name in ("uint32", "uint64"):
        values = values.astype(np.int64)
    return torch.from_numpy(values)


def from_torch(tensor: torch.Tensor, dtype_name: str) -> mx.array:
    dtype = getattr(mx, dtype_name)
    if tensor.dtype == torch.bfloat16:
        return mx.array(tensor.float().numpy()).astype(dtype)
    return mx.array(tensor.numpy()).astype(dtype)


def rng_key() -> list[int]:
    """MLX's global RNG key (two uint32)."""
    return [int(value) for value in np.array(mx.random.state[0]).tolist()]


def set_rng_key(key: list[int]) -> None:
    """Put MLX's global RNG back to `key`: mx.random.seed(s) sets the key to (s >> 32, s & 0xffffffff)."""
    mx.random.seed((int(key[0]) << 32) | int(key[1]))


class ScheduleState:
    """The scheduler file's content: the LR is a function of the optimizer's step count, saved with the optimizer."""

    def __init__(self, step: int, warmup_steps: int, total_steps: int):
        self.values = {"engine": "mlx", "step": step, "warmup_steps": warmup_steps, "total_steps": total_steps}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.values)


def optimizer_state(optimizer) -> dict[str, Any]:
    flat = tree_flatten(optimizer.state)
    return {"format": "mlx", "tensors": {key: to_torch(value) for key, value in flat},
            "dtypes": {key: _dtype_name(value) for key, value in flat}}


def save(run_dir: Path, step: int, *, model, optimizer, schedule: ScheduleState, trainer_state: dict[str, Any],
         meta: dict[str, Any], keep: int) -> Path:
    tensors = {key: to_torch(value) for key, value in tree_flatten(model.trainable_parameters())}
    state = {**trainer_state, "mlx_rng": rng_key()}
    return ckpt.save_checkpoint(run_dir, step, model=None, optimizer=None, scheduler=schedule, trainer_state=state,
                                meta={**meta, "engine": "mlx"}, keep=keep, tensors=tensors,
                                optimizer_state=optimizer_state(optimizer))


def restore(checkpoint: ckpt.Checkpoint, *, model, optimizer) -> dict[str, Any]:
    """Put a verified checkpoint's arrays, optimizer state and RNGs back; returns its trainer state. The optimizer's
    state dict is refilled in place (a compiled step holds a reference to it)."""
    if checkpoint.meta.get("engine") != "mlx":
        raise UserError(f"checkpoint {checkpoint.path} was written by the torch engine",
                        hint="resume it with --engine torch")
    expected = {key: value for key, value in tree_flatten(model.trainable_parameters())}
    saved = mx.load(str(checkpoint.path / "trainable.safetensors"))
    if set(saved) != set(expected):
        missing = sorted(set(expected) - set(saved))[:3]
        raise UserError(f"checkpoint {checkpoint.path} does not match this model (e.g. {missing or sorted(saved)[:3]})",
                        hint="resume with the same --model, --method and LoRA settings")
    model.load_weights([(key, value.astype(expected[key].dtype)) for key, value in saved.items()], strict=False)
    stored = torch.load(checkpoint.path / "optimizer.pt", weights_only=True)
    if stored.get("format") != "mlx":
        raise UserError(f"checkpoint {checkpoint.path} holds a torch optimizer state",
                        hint="resume with --engine torch")
    tree = tree_unflatten([(key, from_torch(tensor, stored["dtypes"][key]))
                           for key, tensor in stored["tensors"].items()])
    state = optimizer.state
    state.clear()
    state.update(tree)
    mx.eval(model.parameters(), optimizer.state)
    ckpt.set_rng_state(json.loads((checkpoint.path / "rng.json").read_text()))
    trainer_state = checkpoint.trainer_state
    if "mlx_rng" in trainer_state:
        set_rng_key(trainer_state["mlx_rng"])
    return trainer_state
