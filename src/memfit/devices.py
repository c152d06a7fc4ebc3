"""The device a run uses when none is named: CUDA, else Apple's MPS, else the CPU."""

from __future__ import annotations


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"
