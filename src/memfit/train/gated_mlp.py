"""A gated MLP's activation and product as one autograd function: down(act(gate(x)) * up(x)) keeps only the gate
and up outputs for backward.

Autograd's graph for `act(a) * b` saves a (for the activation's backward), act(a) and b (for the product's), and
the down projection saves the product c when it has LoRA adapters or trains (its input, for its weight gradient):
four tensors of tokens x intermediate per layer, most of a layer's activations (llama, qwen, mistral, smollm: the
intermediate is 2.7-5.4x the width). Here only a and b are saved and act(a) is recomputed in backward (one
elementwise pass); when the down projection is a fused plain LoRA linear (memfit.train.lora_linear), c is recomputed
too and only c A^T (tokens x rank) is kept. So 2 of the 4 are saved, 3 in full training where down's weight
gradient needs c (tests/test_gated_mlp.py counts them); the outputs and gradients are autograd's bit for bit. What
it saves: per layer `benchmarks/saved_for_backward.py`, on a whole step `benchmarks/train_vs_hf.py` (README,
"Performance").

Fused: an MLP whose forward is transformers' `down_proj(act_fn(gate_proj(x)) * up_proj(x))` with SiLU or tanh-GELU
(most decoder models' MLPs are copies of LlamaMLP's). Its projections stay what they are (PEFT layers, bitsandbytes
layers, plain linears), so checkpoints, exports and merging are unchanged. Other MLPs keep their forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from memfit.train.forward_source import forward_statements
from memfit.train.lora_linear import fused_lora_tensors, lora_adapter_grads, lora_forward, lora_input_grad

# The one statement of the forward this module replaces (transformers 5: LlamaMLP and its copies).
GATED_MLP_STATEMENT = "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))"


class Activation:
    """An activation's forward and its backward from the saved input (aten's own backward kernel: one pass)."""

    def __init__(self, forward, backward):
        self.forward, self.backward = forward, backward


SILU = Activation(F.silu, lambda grad, a: torch.ops.aten.silu_backward(grad, a))
GELU_TANH = Activation(lambda a: F.gelu(a, approximate="tanh"),
                       lambda grad, a: torch.ops.aten.gelu_backward(grad, a, approximate="tanh"))


def activation_of(act_fn) -> Activation | None:
    """The Activation that `act_fn` (an MLP's module) computes, or None for one not handled here."""
    from transformers.activations import GELUTanh, SiLUActivation

    if type(act_fn) in (SiLUActivation, torch.nn.SiLU):
        return SILU
    if type(act_fn) is GELUTanh and getattr(act_fn.act, "func", None) is F.gelu:  # not the Python-formula variant
        return GELU_TANH
    return None


class _GatedProduct(torch.autograd.Function):
    """c = act(a) * b, saving a and b only."""

    @staticmethod
    def forward(ctx, a, b, act):
        ctx.save_for_backward(a, b)
        ctx.act = act
        return act.forward(a).mul_(b)

    @staticmethod
    def backward(ctx, grad_c):
        a, b = ctx.saved_tensors
        return _gated_product_grads(ctx.act, a, b, grad_c) + (None,)


def _gated_product_grads(act: Activation, a, b, grad_c, activated=None, grad_c_is_ours: bool = False):
    """The gradients of a and b for c = act(a) * b. `activated` is act(a) when the caller has it; its buffer
    becomes b's gradient, and grad_c's becomes a's input to the activation's backward when the caller owns it."""
    activated = act.forward(a) if activated is None else activated
    grad_b = activated.mul_(grad_c)
    scaled = grad_c.mul_(b) if grad_c_is_ours else grad_c * b
    return act.backward(scaled, a), grad_b


class _GatedLoraDown(torch.autograd.Function):
    """down(act(a) * b) with `down` a plain LoRA linear (lora_linear.lora_forward): saves a, b and c A^T; c is
    recomputed for A's gradient."""

    @staticmethod
    def forward(ctx, a, b, act, weight, bias, lora_a, lora_b, scaling):
        rows = act.forward(a).mul_(b).reshape(-1, a.shape[-1])
        out, down = lora_forward(rows, weight, bias, lora_a, lora_b, scaling)
        ctx.save_for_backward(a, b, down, weight, lora_a, lora_b)
        ctx.act, ctx.scaling = act, scaling
        return out.reshape(*a.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        a, b, down, weight, lora_a, lora_b = ctx.saved_tensors
        act, scaling = ctx.act, ctx.scaling
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_down = grad_rows @ lora_b
        activated = act.forward(a)
        # c again, for A's gradient only, and freed before c's own gradient exists: one intermediate-sized tensor
        # fewer at this layer's backward peak.
        rows = (activated * b).reshape(-1, a.shape[-1])
        grad_lora_a, grad_lora_b = lora_adapter_grads(grad_rows, grad_down, rows, down, scaling,
                                                      ctx.needs_input_grad[5], ctx.needs_input_grad[6])
        del rows
        grad_a = grad_b = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_c = lora_input_grad(grad_rows, grad_down, weight, lora_a, scaling).reshape(a.shape)
            grad_a, grad_b = _gated_product_grads(act, a, b, grad_c, activated, grad_c_is_ours=True)
        return grad_a, grad_b, None, None, None, grad_lora_a, grad_lora_b, None


def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
    a, b = self.gate_proj(x), self.up_proj(x)
    if a.dtype != b.dtype or a.shape != b.shape:  # a product that broadcasts or promotes: autograd's own graph
        return self.down_proj(self.act_fn(a) * b)
    act = self._memfit_activation
    lora = fused_lora_tensors(self.down_proj, a)
    if lora is not None:
        return _GatedLoraDown.apply(a, b, act, *lora)
    return self.down_proj(_GatedProduct.apply(a, b, act))


def _is_gated_mlp(module: torch.nn.Module) -> bool:
    return (all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))
            and _computes_gated_mlp(type(module).forward))


def _computes_gated_mlp(forward) -> bool:
    """Whether `forward`'s source is GATED_MLP_STATEMENT and nothing else."""
    body = forward_statements(forward)
    # `return <statement>` or `name = <statement>` then `return name`: nothing else in the forward.
    if len(body) == 1:
        return body[0] == f"return {GATED_MLP_STATEMENT}"
    if len(body) == 2 and " = " in body[0]:
        name, value = body[0].split(" = ", 1)
        return value == GATED_MLP_STATEMENT and body[1] == f"return {name}"
    return False


def fuse_gated_mlps(model: torch.nn.Module) -> int:
    """Give every gated MLP in `model` whose activation is handled here the fused forward (an instance attribute:
    hooks, state dict and the class stay as they are); the number of MLPs fused."""
    fused = 0
    for module in model.modules():
        act = activation_of(module.act_fn) if hasattr(module, "act_fn") else None
        if act is not None and _is_gated_mlp(module):
            module._memfit_activation = act
            module.forward = types.MethodType(_fused_forward, module)
            fused += 1
    return fused
