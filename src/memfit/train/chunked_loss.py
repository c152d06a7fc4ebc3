"""Cross-entropy through the lm_head, chunk by chunk, without the full `tokens x vocab` logits.

The plain loss holds the logits (tokens x vocab, compute dtype), their fp32 copy, the log-softmax saved for
backward and the gradient of each: for Llama-3's 128k vocab at 8 x 2048 tokens that is several GB, often the
largest term of a LoRA step. Here the logits of one chunk of tokens at a time are computed, turned into the loss
and, in the same pass, into the gradient w.r.t. the hidden states (and the lm_head weight when it trains); only
those gradients are kept for backward. What lives at once: one chunk's fp32 logits, sized like the hidden states
(the chunk rule below), plus a hidden-sized gradient. This is the approach of Liger-Kernel's fused linear
cross-entropy, in plain PyTorch so it runs on CPU, MPS and CUDA alike.

Only scored tokens go through the head (prompt and padding positions are dropped by the caller before the call),
which also saves the head's matmul for them: on a large-vocab model the lm_head is a large share of the compute.

`--no-chunked-loss` turns this off (the model computes full logits, as transformers does).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from memfit.train.chunk_size import even_chunk_tokens

# Models whose logits are not just `lm_head(hidden)`: a final soft-cap or a scale applied after the head. The
# chunked path would skip that step, so these keep the full logits.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def causal_lm_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside the wrappers (DDP and the like, PEFT)."""
    while True:  # DDP and the like hold it as .module, torch.compile as ._orig_mod
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            break
        model = inner
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def chunked_loss_blocker(model: torch.nn.Module) -> str | None:
    """Why the chunked loss cannot run on `model` (None when it can)."""
    causal_lm = causal_lm_of(model)
    head = causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return "its output layer is not a linear layer"
    if not head.weight.dtype.is_floating_point:  # bitsandbytes' Linear4bit/8bitLt are nn.Linear with int weights
        return "its output layer is quantized"
    text_config = causal_lm.config.get_text_config()
    for name in _LOGIT_TRANSFORMS:
        value = getattr(text_config, name, None)
        if value not in (None, 1, 1.0, False):
            return f"its logits are transformed after the output layer ({name}={value})"
    return None


@contextmanager
def head_returns_hidden(model: torch.nn.Module):
    """Within the block, `model(...).logits` are the final hidden states: the lm_head passes its input through.

    The head is bypassed by an instance attribute over its `forward` (its weights and state dict are untouched,
    and hooks still run), so the model's own forward, wrappers included (PEFT, accelerate), stays in charge."""
    head = causal_lm_of(model).get_output_embeddings()
    had_own = "forward" in vars(head)
    previous = vars(head).get("forward")
    head.forward = _identity
    try:
        yield head
    finally:
        if had_own:
            head.forward = previous
        else:
            del head.forward


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_t w_t * CE(hidden_t @ weight.T + bias, target_t), gradients computed in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, token_weights, compute_dtype, chunk):
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        matmul_weight = weight.to(compute_dtype)
        matmul_bias = bias.to(compute_dtype) if bias is not None else None
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if needs_bias else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            end = min(start + chunk, hidden.shape[0])
            piece = hidden[start:end].to(compute_dtype)
            logits = piece @ matmul_weight.T
            if matmul_bias is not None:
                logits = logits + matmul_bias
            logits = logits.float()
            target = targets[start:end]
            weights = token_weights[start:end]
            target_logit = logits.gather(1, target[:, None]).squeeze(1)
            sum_exp, row_max = _exp_in_place(logits)  # logits now hold exp(logits - row max)
            log_norm = sum_exp.log() + row_max
            loss += ((log_norm - target_logit) * weights).sum()
            if not (needs_hidden or needs_weight or needs_bias):
                continue
            # d(w * CE)/d(logits) = w * (softmax - onehot), built in the logits' own buffer.
            grad_logits = logits.div_(sum_exp[:, None])
            grad_logits[torch.arange(end - start, device=logits.device), target] -= 1.0
            grad_logits.mul_(weights[:, None])
            if needs_bias:
                grad_bias += grad_logits.sum(0)
            grad_logits = grad_logits.to(compute_dtype)
            if needs_hidden:
                grad_hidden[start:end] = grad_logits @ matmul_weight
            if needs_weight:
                grad_weight += (grad_logits.T @ piece).float()
            del logits, grad_logits
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.param_dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.param_dtypes
        # The loss is a scalar: its incoming gradient only scales what the forward pass already computed.
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(weight_dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_loss).to(bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _exp_in_place(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn fp32 `logits` (tokens x vocab) into exp(logits - row max) in their own buffer; return each row's sum of
    those and its max, so log-sum-exp = log(sum) + max and softmax = logits / sum.

    Not torch.logsumexp: its kernel makes a temporary the size of its input ((x - max).exp(), inside one aten op,
    on every device), one more chunk of fp32 logits at the head's peak that the fake-tensor trace cannot see (48 MB
    per 256-token chunk of a 49k vocab: `python benchmarks/head_transient.py --write`). In place there is no such
    buffer, and one exp over the chunk instead of two (the softmax reuses it)."""
    row_max = logits.amax(dim=-1)
    # A row of -inf (nothing reachable) would make inf - inf: shift it by 0 instead, as torch.logsumexp does.
    row_max = row_max.masked_fill(row_max.isinf(), 0.0)
    logits.sub_(row_max[:, None]).exp_()
    return logits.sum(dim=-1), row_max


def linear_cross_entropy(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor,
                         token_weights: torch.Tensor, compute_dtype: torch.dtype | None = None,
                         chunk: int | None = None) -> torch.Tensor:
    """sum_t w_t * CE_t over the rows of `hidden` (tokens x hidden_size), in fp32, through `head`.

    `targets` (tokens,) are the next-token ids; `token_weights` (tokens,) what each token's CE counts for. The
    matmuls run in `compute_dtype` (default: the head weight's dtype), the softmax in fp32."""
    if not torch.is_grad_enabled():  # evaluation: no gradients to compute alongside
        return (linear_token_losses(hidden, head, targets, compute_dtype, chunk) * token_weights.float()).sum()
    compute_dtype = compute_dtype or head.weight.dtype
    chunk = chunk or even_chunk_tokens(hidden.shape[0], head.weight.shape[0], head.weight.shape[1])
    return _LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, token_weights.float(),
                                     compute_dtype, chunk)


@torch.no_grad()
def linear_token_losses(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor,
                        compute_dtype: torch.dtype | None = None, chunk: int | None = None) -> torch.Tensor:
    """Each token's CE (tokens,), fp32, chunk by chunk: for evaluation, where no gradient is needed."""
    compute_dtype = compute_dtype or head.weight.dtype
    chunk = chunk or even_chunk_tokens(hidden.shape[0], head.weight.shape[0], head.weight.shape[1])
    weight = head.weight.to(compute_dtype)
    bias = head.bias.to(compute_dtype) if head.bias is not None else None
    losses = []
    for start in range(0, hidden.shape[0], chunk):
        logits = hidden[start:start + chunk].to(compute_dtype) @ weight.T
        if bias is not None:
            logits = logits + bias
        logits = logits.float()
        target_logit = logits.gather(1, targets[start:start + chunk, None]).squeeze(1)
        sum_exp, row_max = _exp_in_place(logits)
        losses.append(sum_exp.log() + row_max - target_logit)
    return torch.cat(losses) if losses else hidden.new_zeros(0, dtype=torch.float32)
