"""The dtypes a configuration trains in, by name (`--dtype` resolved as memfit.precision resolves it), so the
estimator's arithmetic needs no torch."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from memfit.estimate.hardware import Hardware

_NAMED_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# memfit.precision's contract (compute, trainable, frozen dtype) by name; tests/test_estimate.py checks it against
# resolve_precision for every dtype and device.
_PRECISIONS = {"fp32": ("float32", "float32", "float32"), "bf16": ("bfloat16", "float32", "bfloat16"),
               "fp16": ("float16", "float32", "float16"), "bf16-pure": ("bfloat16", "bfloat16", "bfloat16")}
# Where none of these exists, no CUDA (or ROCm, or WSL GPU) driver is loaded: torch.cuda.is_available() is False.
_GPU_DRIVER_PATHS = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/kfd", "/dev/dxg")


@dataclass(frozen=True)
class Precision:
    """memfit.precision.Precision by dtype names: what the arithmetic reads, without importing torch."""

    name: str
    compute: str
    trainable: str
    frozen: str

    @property
    def autocast(self) -> bool:
        return self.name in ("bf16", "fp16")

    @property
    def compute_bytes(self) -> int:
        return _NAMED_BYTES[self.compute]

    @property
    def trainable_bytes(self) -> int:
        return _NAMED_BYTES[self.trainable]

    @property
    def frozen_bytes(self) -> int:
        return _NAMED_BYTES[self.frozen]

    def torch(self):
        """The memfit.precision.Precision with torch dtypes (what a trace runs with)."""
        import torch

        from memfit.precision import Precision as TorchPrecision

        return TorchPrecision(self.name, getattr(torch, self.compute), getattr(torch, self.trainable),
                              getattr(torch, self.frozen))


def _no_gpu_driver() -> bool:
    if sys.platform == "darwin":
        return True
    return sys.platform.startswith("linux") and not any(os.path.exists(path) for path in _GPU_DRIVER_PATHS)


def resolve_dtypes(dtype: str, device: str) -> Precision:
    """`--dtype` on `device` as memfit.precision.resolve_precision resolves it. torch is imported only to ask
    whether a CUDA GPU supports bf16 (`auto` on cuda where a GPU driver is present) and for its error messages."""
    if dtype == "auto" and (device in ("cpu", "mps") or (device == "cuda" and "torch" not in sys.modules
                                                           and _no_gpu_driver())):
        dtype = {"cpu": "fp32"}.get(device, "bf16")
    if dtype in _PRECISIONS and not (dtype == "fp16" and device == "cpu"):
        return Precision(dtype, *_PRECISIONS[dtype])
    from memfit.precision import resolve_precision

    real = resolve_precision(dtype, device)
    names = (str(d).removeprefix("torch.") for d in (real.compute_dtype, real.trainable_dtype, real.frozen_dtype))
    return Precision(real.name, *names)


def traced_precision(precision: Precision, hardware: Hardware) -> Precision:
    """The dtypes the step really runs with: DeepSpeed runs a 16-bit model (no autocast copies of fp32 weights),
    and FSDP computes on gathered 16-bit copies (its param_dtype) with no autocast copies either."""
    if hardware.zero >= 1 and precision.autocast:
        return Precision(precision.name, precision.compute, precision.compute, precision.compute)
    return precision
