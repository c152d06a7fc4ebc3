"""The precision contract: what `--dtype` means for weights, gradients, optimizer states and compute.

- `bf16` / `fp16`: mixed precision. Trained parameters (and so their gradients and optimizer states) stay fp32
  (the "master weights"); matmuls run in 16-bit under autocast. Frozen base weights (LoRA) are stored in 16-bit.
- `bf16-pure`: weights, gradients and optimizer states all bf16, no autocast.
- `fp32`: everything fp32, no autocast.
- `auto`: bf16 on CUDA with bf16 support and on MPS, fp16 on older CUDA, fp32 on CPU (bf16 autocast on CPU is
  slow on most chips and gives nothing back in memory, since master weights stay fp32 anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memfit.errors import UserError

_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


@dataclass(frozen=True)
class Precision:
    name: str  # resolved: bf16 | fp16 | fp32 | bf16-pure
    compute_dtype: torch.dtype
    trainable_dtype: torch.dtype  # dtype of trained params, their grads and optimizer states
    frozen_dtype: torch.dtype  # dtype of frozen (non-quantized) base weights under LoRA/QLoRA

    @property
    def autocast(self) -> bool:
        return self.name in ("bf16", "fp16")

    @property
    def accelerate_mixed_precision(self) -> str:
        return self.name if self.autocast else "no"

    @property
    def compute_bytes(self) -> int:
        return _BYTES[self.compute_dtype]

    @property
    def trainable_bytes(self) -> int:
        return _BYTES[self.trainable_dtype]

    @property
    def frozen_bytes(self) -> int:
        return _BYTES[self.frozen_dtype]


def resolve_precision(dtype: str, device: str) -> Precision:
    if dtype == "auto":
        dtype = _auto_dtype(device)
    if dtype == "fp32":
        return Precision("fp32", torch.float32, torch.float32, torch.float32)
    if dtype == "bf16":
        return Precision("bf16", torch.bfloat16, torch.float32, torch.bfloat16)
    if dtype == "fp16":
        if device == "cpu":
            raise UserError("--dtype fp16 is not supported for training on CPU", hint="use --dtype bf16 or fp32")
        return Precision("fp16", torch.float16, torch.float32, torch.float16)
    if dtype == "bf16-pure":
        return Precision("bf16-pure", torch.bfloat16, torch.bfloat16, torch.bfloat16)
    raise UserError(f"unknown --dtype {dtype!r}", hint="choose auto, bf16, fp16, fp32 or bf16-pure")


def _auto_dtype(device: str) -> str:
    if device == "cuda":
        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            return "fp16"
        return "bf16"
    if device == "mps":
        return "bf16"
    return "fp32"
