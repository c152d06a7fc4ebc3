"""The MLX engine's loss: sum_t w_t * CE_t over a micro-batch, through the full logits or chunk by chunk.

The chunked form is the MLX side of `--chunked-loss` (memfit/train/chunked_loss.py on torch): the backbone's hidden
states go through the lm_head a chunk of tokens at a time, each chunk under `nn.utils.checkpoint`, so its fp32
logits live only while that chunk's loss (or, in the backward pass, its gradient) is computed. Full logits of a
49k-vocab model at 4 x 256 tokens are 200 MB in fp32, of a 152k-vocab one 620 MB; mlx-lm keeps them, and their
gradient, for the whole backward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

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

    def chunk_loss(hidden: mx.array, targets: mx.array, weights: mx.array) -> mx.array:
        # The checkpoint differentiates with respect to every input; token ids have no gradient (MLX refuses one).
        targets, weights = mx.stop_gradient(targets), mx.stop_gradient(weights)
        return weighted_sum(apply(module, hidden), targets, weights)

    # Recomputed in the backward pass from the chunk's hidden states: only one chunk's logits at a time.
    chunk_loss = nn.utils.checkpoint(module, chunk_loss)

    def chunked_weighted_ce(model, inputs: mx.array, targets: mx.array, weights: mx.array) -> mx.array:
        rows, width = inputs.shape
        tokens = rows * width
        step = mlx_chunks(tokens, model.args.vocab_size, model.args.hidden_size)
        if not step:  # too few chunks to save memory (MLX_MIN_CHUNKS): the full-logits loss, mlx-lm's arrays (the
            # head on the reshaped hidden states held 0.85 MB more on smollm2-135m at 1 x 127: the reshape's copies)
            return weighted_ce(model, inputs, targets, weights)
        hidden = model.model(inputs)
        hidden = hidden.reshape(tokens, hidden.shape[-1])
        targets, weights = targets.reshape(-1), weights.reshape(-1)
        total = mx.array(0.0)
        for start in range(0, tokens, step):
            end = min(start + step, tokens)
            total = total + chunk_loss(hidden[start:end], targets[start:end], weights[start:end])
        return total

    return chunked_weighted_ce
