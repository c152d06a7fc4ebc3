"""RMSNorm as one autograd function: the same output, fewer tensors made and kept.

transformers' LlamaRMSNorm (and its copies: qwen2, mistral, smollm, ...) is five elementwise steps, each a new
tensor of tokens x width, and its backward is as many again; a decoder layer runs two norms. Under memfit's CPU
allocator policy (memfit.allocator: every block over 1 MiB is a fresh mmap) each of those is page faults and
zeroing too. Here the forward makes the output and one (tokens x 1) statistic, and the backward makes the gradient
and one temporary. What it keeps for backward: the input and the statistic, where autograd keeps the fp32 copy of a
bf16/fp16 input and, when the weight trains (full training), the normalized input as well.

Forward + backward of a (1024, 576) fp32 norm with a frozen weight, one CPU thread, memfit's allocator policy:
8.0 ms as transformers computes it, 4.5 ms fused; bf16, 10.0 and 7.2 ms (`python benchmarks/layer_kernels.py
--repeats 5 --iterations 20 --write`, docs/benchmarks.md). The output is transformers' bit for bit (the same
operations in the same order); the gradients agree to rounding (tests/test_rms_norm.py).

Fused: a norm whose forward is exactly RMS_NORM_FORWARD (the source is compared, one look per class), as an
instance attribute, so hooks, the state dict and the class are unchanged. Other norms (Gemma's 1 + weight, layer
norms) keep their forward.
"""

from __future__ import annotations

import types

import torch

from memfit.train.forward_source import forward_statements

# The forward this module replaces, statement for statement (transformers 5: LlamaRMSNorm and its copies).
RMS_NORM_FORWARD = (
    "input_dtype = hidden_states.dtype",
    "hidden_states = hidden_states.to(torch.float32)",
    "variance = hidden_states.pow(2).mean(-1, keepdim=True)",
    "hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)",
    "return self.weight * hidden_states.to(input_dtype)",
)


class _RmsNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        normed = (x32 * rstd).to(x.dtype)
        ctx.save_for_backward(x, rstd, weight)
        if torch.result_type(weight, normed) == normed.dtype:  # in place: the output is normed's buffer
            return normed.mul_(weight)
        return weight * normed

    @staticmethod
    def backward(ctx, grad_out):
        x, rstd, weight = ctx.saved_tensors
        grad_weight = None
        if ctx.needs_input_grad[1]:
            normed = (x.to(torch.float32) * rstd).to(x.dtype)
            grad_weight = (grad_out * normed).reshape(-1, normed.shape[-1]).sum(0).to(weight.dtype)
            del normed
        grad_x = None
        if ctx.needs_input_grad[0]:
            # Through x's dtype as autograd goes (the product's gradient is cast to its input's dtype).
            grad_normed = (grad_out * weight).to(x.dtype).to(torch.float32)
            x32 = x.to(torch.float32)
            # d/dx of x * rsqrt(mean(x^2) + eps): rstd * g - x * rstd^3 * mean(g * x)
            coefficient = torch.linalg.vecdot(grad_normed, x32).unsqueeze(-1).mul_(rstd.pow(3)).div_(x.shape[-1])
            grad_x = grad_normed.mul_(rstd).sub_(x32 * coefficient).to(x.dtype)
        return grad_x, grad_weight, None


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if self.weight.shape != hidden_states.shape[-1:]:  # a weight that broadcasts otherwise: transformers' own
        return type(self).forward(self, hidden_states)
    return _RmsNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def fuse_rms_norms(model: torch.nn.Module) -> int:
    """Give every RMSNorm in `model` that computes RMS_NORM_FORWARD the fused forward; the number fused."""
    fused = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (isinstance(weight, torch.Tensor) and weight.dim() == 1 and hasattr(module, "variance_epsilon")
                and forward_statements(type(module).forward) == RMS_NORM_FORWARD):
            module.forward = types.MethodType(_fused_forward, module)
            fused += 1
    return fused
