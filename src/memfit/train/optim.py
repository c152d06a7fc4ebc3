"""Optimizers by name. Each one's state size is what the estimator's `optimizer` term counts."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from memfit.errors import UserError


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0):
    params = [param for param in params if param.requires_grad]
    if not params:
        raise UserError("nothing to train: no parameter requires a gradient", hint="check --method/--lora-targets")
    if name == "adamw":
        # fused: one kernel per step with no temporaries (the default foreach path allocates a copy of every
        # state at once, a peak the size of the whole optimizer state). Falls back where fused is unsupported.
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, ValueError):
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.0)
    raise UserError(f"unknown --optimizer {name!r}", hint="choose adamw, adamw8bit, adafactor or sgd")
