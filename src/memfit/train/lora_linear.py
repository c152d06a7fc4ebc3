"""A LoRA linear layer's forward and backward in one autograd function: y = x W^T + b + s (x A^T) B^T.

PEFT's `lora.Linear.forward` computes `result + lora_B(lora_A(dropout(x))) * scaling` as four autograd ops: the
forward makes three extra tensors the size of the output (B's product, its scaled copy, the sum) and the backward
one the size of the output (the scaled gradient) and three the size of the input (two partial input gradients and
their sum). On a CPU those temporaries are memory traffic, and under memfit's allocator policy (1 MiB mmap
threshold, memfit.allocator) each is a fresh mapping with a page fault per page. Here B's product is accumulated
into the base output in place (`addmm_`), and the LoRA part of the input gradient into the base part: one tensor
each way. What is saved for backward is what autograd saves for PEFT's graph (the input and x A^T), so the peak
does not grow. What it gains on a whole step: `benchmarks/step_cost.py --rows bare-chunked,bare-fused` and the
head-to-head `benchmarks/train_vs_hf.py` (README, "Performance").

Only plain LoRA on a float `nn.Linear` is fused (one adapter, no dropout, no DoRA or other variant, no LoRA bias,
the base weight frozen, every tensor in one dtype); anything else, and a merged or disabled adapter or a mixed
batch (`adapter_names`), or a forward under autocast (whose casts this function would not mirror in backward),
runs PEFT's own forward. The adapter weights stay PEFT's parameters, so checkpoints, exports and
`merge_and_unload` are unchanged.
"""

from __future__ import annotations

import types

import torch


def lora_forward(rows: torch.Tensor, weight, bias, lora_a, lora_b, scaling: float):
    """rows W^T + b + s (rows A^T) B^T for `rows` (tokens x in): the output and rows A^T (tokens x r), which the
    backward pass needs besides the rows."""
    down = rows @ lora_a.T
    out = torch.addmm(bias, rows, weight.T) if bias is not None else rows @ weight.T
    out.addmm_(down, lora_b.T, alpha=scaling)
    return out, down


def lora_input_grad(grad_rows: torch.Tensor, grad_down: torch.Tensor, weight, lora_a, scaling: float):
    """The gradient of lora_forward's rows (tokens x in), given grad_down = grad_rows B (tokens x r, unscaled)."""
    grad_x = grad_rows @ weight
    grad_x.addmm_(grad_down, lora_a, alpha=scaling)
    return grad_x


def lora_adapter_grads(grad_rows, grad_down, rows, down, scaling: float, needs_a: bool, needs_b: bool):
    """The gradients of A and B (None where not needed) from grad_down = grad_rows B and lora_forward's down."""
    grad_a = (grad_down.T @ rows).mul_(scaling) if needs_a else None
    grad_b = (grad_rows.T @ down).mul_(scaling) if needs_b else None
    return grad_a, grad_b


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        rows = x.reshape(-1, x.shape[-1])
        out, down = lora_forward(rows, weight, bias, lora_a, lora_b, scaling)
        ctx.save_for_backward(rows, down, weight, lora_a, lora_b)
        ctx.scaling = scaling
        ctx.input_shape = x.shape
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        rows, down, weight, lora_a, lora_b = ctx.saved_tensors
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_down = grad_rows @ lora_b  # tokens x r, before the scaling (applied once, in each use)
        grad_x = None
        if ctx.needs_input_grad[0]:  # not for the first layers' input when nothing below them trains
            grad_x = lora_input_grad(grad_rows, grad_down, weight, lora_a, ctx.scaling).reshape(ctx.input_shape)
        grad_a, grad_b = lora_adapter_grads(grad_rows, grad_down, rows, down, ctx.scaling,
                                            ctx.needs_input_grad[3], ctx.needs_input_grad[4])
        return grad_x, None, None, grad_a, grad_b, None


def _fusable(layer) -> bool:
    """Whether `layer` (a PEFT lora.Linear) is plain LoRA on a frozen float nn.Linear, as set up."""
    base = layer.base_layer
    if type(base) is not torch.nn.Linear or getattr(layer, "fan_in_fan_out", False):
        return False
    if len(layer.lora_A) != 1 or layer.lora_variant or any(getattr(layer, "lora_bias", {}).values()):
        return False
    (name,) = layer.lora_A.keys()
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity) or layer.lora_A[name].bias is not None:
        return False
    tensors = [base.weight, layer.lora_A[name].weight, layer.lora_B[name].weight]
    if base.bias is not None:
        tensors.append(base.bias)
    return (base.weight.dtype.is_floating_point and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad)
            and len({tensor.dtype for tensor in tensors}) == 1)


def fused_lora_tensors(layer, x: torch.Tensor) -> tuple | None:
    """(weight, bias, A, B, scaling) of a layer that fuse_lora_linears fused, where its fused forward applies to
    `x` now; None where PEFT's own forward must run (or the layer was never fused)."""
    if getattr(layer.forward, "__func__", None) is not _fused_forward:
        return None
    names = list(layer.lora_A.keys())  # an adapter added since fuse_lora_linears: PEFT's path runs both
    if (layer.disable_adapters or layer.merged or list(layer.active_adapters) != names or len(names) != 1
            or x.dtype != layer.base_layer.weight.dtype or torch.is_autocast_enabled(x.device.type)):
        return None
    (name,) = names
    base = layer.base_layer
    return base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    tensors = None if args or kwargs else fused_lora_tensors(self, x)
    if tensors is None:
        return type(self).forward(self, x, *args, **kwargs)  # PEFT's own path for everything else
    return _LoraLinear.apply(x, *tensors)


def fuse_lora_linears(model: torch.nn.Module) -> int:
    """Give every fusable PEFT lora.Linear in `model` the fused forward (an instance attribute: hooks, state dict
    and PEFT's class stay as they are); the number of layers fused."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    fused = 0
    for module in model.modules():
        if type(module) is LoraLinear and _fusable(module):
            module.forward = types.MethodType(_fused_forward, module)
            fused += 1
    return fused
