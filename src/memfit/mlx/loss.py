"""The MLX engine's loss: sum_t w_t * CE_t over a micro-batch, through the full logits or chunk by chunk.

The chunked form is the MLX side of `--chunked-loss` (memfit/train/chunked_loss.py on torch): the backbone's hidden
states go through the lm_head a chunk of tokens at a time, so a chunk's fp32 logits live only while that chunk's
loss and gradient are computed. Full logits of a 49k-vocab model at 4 x 256 tokens are 200 MB in fp32, of a
152k-vocab one 620 MB; mlx-lm keeps them, and their gradient, for the whole backward pass.

When the head does not train (LoRA, QLoRA: the usual case), each chunk computes its loss and, in the same pass, the
gradient w.r.t. its hidden states, which is all the backward pass needs from it (Liger-Kernel's fused linear
cross-entropy, as memfit's torch loss does): two matmuls per chunk, as the full logits take. When the head trains,
each chunk runs under `nn.utils.checkpoint` and its logits are recomputed in the backward pass: a third matmul.
That recomputation cost the tiny model (2k vocab, 4 x 256) 8-14% of its tokens/s against the full logits (two
runs of each, 12 steps, `memfit train --engine mlx`); the fused chunks ran at 475-477 tokens/s against the full
logits' 474-484, and peaked at 53.4 MB against 72.3 (the checkpointed chunks: 55.1).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from memfit.models.arch import MLX_PLAIN_HEAD_TYPES
from memfit.train.chunk_size import mlx_chunks

# Other architectures than MLX_PLAIN_HEAD_TYPES (gemma's scaled and soft-capped logits, ...) take the full-logits loss.


def weighted_sum(logits: mx.array, targets: mx.array, weights: mx.array) -> mx.array:
    """sum_t w_t * CE_t, the logits upcast to fp32 (as the torch engine's loss)."""
    return (nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="none") * weights).sum()


def weighted_ce(model, inputs: mx.array, targets: mx.array, weights: mx.array) -> mx.array:
    """sum_t w_t * CE_t over a micro-batch, through the full logits."""
    return weighted_sum(model(inputs), targets, weights)


def plain_head(model) -> tuple[nn.Module, Callable[[nn.Module, mx.array], mx.array]] | None:
    """(the module that holds the head's weights, how to apply it) for a plain-head architecture, else None."""
    if getattr(model, "model_type", None) not in MLX_PLAIN_HEAD_TYPES or not hasattr(model, "model"):
        return None
    if getattr(model.args, "tie_word_embeddings", False):
        return model.model.embed_tokens, lambda embed, hidden: embed.as_linear(hidden)
    if hasattr(model, "lm_head"):
        return model.lm_head, lambda head, hidden: head(hidden)
    return None


def supports_chunked_loss(model) -> bool:
    return plain_head(model) is not None


def make_loss(model, chunked: bool) -> Callable[..., mx.array]:
    """The loss function `nn.value_and_grad(model, ...)` differentiates: chunked when asked and the architecture's
    head is a plain projection, the full-logits loss otherwise."""
    head = plain_head(model) if chunked else None
    if head is None:
        return weighted_ce
    module, apply = head
    fused = not tree_flatten(module.trainable_parameters())
    chunk_loss = _fused_chunk(module, apply) if fused else _checkpointed_chunk(module, apply)

    def chunked_weighted_ce(model, inputs: mx.array, targets: mx.array, weights: mx.array) -> mx.array:
        rows, width = inputs.shape
        tokens = rows * width
        step = mlx_chunks(tokens, model.args.vocab_size, model.args.hidden_size)
        if not step:  # too few chunks to save memory (MLX_MIN_CHUNKS): the full-logits loss, mlx-lm's arrays. A
            # checkpointed single chunk held 0.85 MB more on smollm2-135m at 1 x 127; one fused chunk needed as much
            # as the full logits do beside mx.checkpoint's recomputation (1 x 128 bf16: 377.4 against 378.8 MiB),
            # which these steps use (memfit.mlx.model.ORDERED_FROM_TOKENS), and MLX ran further ahead with it
            # (464.4 against 406.6 MB held with no memory limit).
            return weighted_ce(model, inputs, targets, weights)
        hidden = model.model(inputs)
        hidden = hidden.reshape(tokens, hidden.shape[-1])
        targets, weights = targets.reshape(-1), weights.reshape(-1)
        total, previous = mx.array(0.0), None
        for start in range(0, tokens, step):
            end = min(start + step, tokens)
            chunk = hidden[start:end]
            if previous is not None and fused:
                chunk = mx.depends(chunk, previous)  # see _fused_chunk
            loss, previous = chunk_loss(chunk, targets[start:end], weights[start:end])
            total = total + loss
        return total

    return chunked_weighted_ce


def _fused_chunk(module: nn.Module, apply) -> Callable[[mx.array, mx.array, mx.array], tuple[mx.array, mx.array]]:
    """(the chunk's loss, d loss / d hidden): the forward pass computes the gradient too, kept for the backward pass
    instead of the chunk's logits (a frozen head: no weight gradient to make).

    The caller makes each chunk's hidden states depend on the previous chunk's gradient (`mx.depends`): MLX
    evaluates the step's graph as a whole, and without that order it started several chunks' logits at once, so on
    head-heavy shapes the chunks held more than the full logits (benchmarks/derive_mlx_constants.py's shape f, 32k
    vocab, 2 x 512 tokens: 562 MB against 536 MB for the full logits and 466 MB for checkpointed chunks)."""

    @mx.custom_function
    def loss_and_grad(hidden: mx.array, targets: mx.array, weights: mx.array) -> tuple[mx.array, mx.array]:
        # The two are outputs of one primitive, evaluated together: the chunk's logits are freed once both exist.
        return mx.value_and_grad(lambda h: weighted_sum(apply(module, h), targets, weights))(hidden)

    @loss_and_grad.vjp
    def loss_and_grad_vjp(primals, cotangents, outputs):
        hidden_grad = (cotangents[0] * outputs[1]).astype(primals[0].dtype)  # the fp32 loss's cotangent would promote it
        return hidden_grad, mx.zeros_like(primals[1]), mx.zeros_like(primals[2])  # token ids and weights: none

    return loss_and_grad


def _checkpointed_chunk(module: nn.Module, apply) -> Callable[[mx.array, mx.array, mx.array], tuple]:
    """(one chunk's loss under a checkpoint, None) for a trained head: its logits recomputed in the backward pass."""

    def chunk_loss(hidden: mx.array, targets: mx.array, weights: mx.array) -> mx.array:
        # The checkpoint differentiates with respect to every input; token ids have no gradient (MLX refuses one).
        targets, weights = mx.stop_gradient(targets), mx.stop_gradient(weights)
        return weighted_sum(apply(module, hidden), targets, weights)

    checkpointed = nn.utils.checkpoint(module, chunk_loss)
    return lambda hidden, targets, weights: (checkpointed(hidden, targets, weights), None)
