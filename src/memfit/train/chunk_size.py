"""How many tokens one chunk of the chunked loss holds (torch's memfit.train.chunked_loss, MLX's memfit.mlx.loss,
and the estimators of both). No torch here: the MLX estimate imports it."""

from __future__ import annotations

import math

# Below this many tokens a chunk's matmuls get inefficient: on 2 CPU cores, 1,100 tokens through a 49k-vocab head
# took 3.1 s in chunks of 8, 1.3 s in chunks of 64, 1.0 s in chunks of 256 (full logits: 1.0 s); with a 152k
# vocab, 18.7 s / 5.8 s / 4.5 s (full: 6.3 s). A 256-token chunk of fp32 logits is 128-156 MB for 128-152k vocabs.
MIN_CHUNK_TOKENS = 256


def chunk_tokens(num_tokens: int, vocab_size: int, hidden_size: int, floor: int | None = None) -> int:
    """Tokens per chunk so one chunk's logits are about the size of all the hidden states (Liger's rule), but not
    fewer than `floor` (MIN_CHUNK_TOKENS, torch's)."""
    chunks = math.ceil(vocab_size / hidden_size)
    liger = 2 ** math.ceil(math.log2(max(1, math.ceil(num_tokens / chunks))))
    return max(1, min(num_tokens, max(liger, MIN_CHUNK_TOKENS if floor is None else floor)))


def even_chunk_tokens(num_tokens: int, vocab_size: int, hidden_size: int) -> int:
    """chunk_tokens spread evenly over as many chunks (torch's chunked loss): 345 tokens in chunks of 256 become
    173 + 172, not 256 + 89. The same matmuls, and a smaller largest chunk of logits, which is what the step's peak
    holds (qwen2.5-0.5b, 345 tokens: 105 MB of fp32 logits, not 156). MLX keeps whole chunks (mlx_chunk_tokens):
    its constants were fitted on those chunks."""
    chunk = chunk_tokens(num_tokens, vocab_size, hidden_size)
    return math.ceil(num_tokens / math.ceil(num_tokens / chunk)) if num_tokens > 0 else chunk


# MLX: fewer chunks than this held more than the plain head. With MLX_MIN_CHUNK_TOKENS' 32-token chunks, on the
# whole smollm2-135m (30 layers, 49k vocabulary), MLX's peak in the compiled trainer: 1 x 128 fp32 with
# checkpointing, four chunks, 694.6 MB against the plain head's 671.1; eight chunks held less: 1 x 256 fp32 710.5
# against 746.5, 1 x 256 bf16 438.7 against 485.7, 2 x 128 fp32 without checkpointing 1,087.9 against 1,208.7; the
# same speed (`python benchmarks/mlx_chunk_floor.py DIR --floors 256,32 ...`, docs/benchmarks.md, 2026-12-05). The
# rule was four chunks at 256 tokens a chunk, measured on the checkpointed chunks that came before the fused ones.
MLX_MIN_CHUNKS = 8


# MLX's floor on a chunk. MLX evaluates the step's graph as a whole, so more than one chunk's logits and softmax are
# live at once; smaller chunks cut that where torch's 256 did not: smollm2-135m cut to 4 layers, 4 x 256 bf16 with
# checkpointing, MLX's peak in the compiled trainer with the floor at 256 (four chunks) / 64 / 32 / 16: 666.1 /
# 304.5 / 230.4 / 234.5 MB at the same speed and loss (`python benchmarks/mlx_chunk_floor.py DIR --floors
# 256,64,32,16 --batch-size 4 --seq-len 256 --dtype bf16`, docs/benchmarks.md, 2026-12-05). Metal's speed at
# 32-token chunks is not measured (no Mac here): each chunk is still 32 x h x V multiply-adds.
MLX_MIN_CHUNK_TOKENS = 32


# MLX: at most this many chunks. Many chunks held more at large batches: at 16,384 tokens, shape f of
# benchmarks/derive_mlx_constants.py (vocabulary 32k, hidden 64) without checkpointing held 1,193.7 MB in 512 chunks
# of 32 against 741.1 in 64 of 256, shape e (16k, 128) with checkpointing 856.7 in 128 chunks against 613.1 in 64;
# f with checkpointing held less in 512 (572.3 against 666.8) and e without about the same (648.7, 644.1). The
# runs: `--chunked --shapes b,e,f,k` before this cap, and the same runs in mlx_constants.json before it.
MLX_MAX_CHUNKS = 64


def mlx_chunk_tokens(num_tokens: int, vocab_size: int, hidden_size: int) -> int:
    """chunk_tokens with MLX's floor (MLX_MIN_CHUNK_TOKENS), raised to a power of two that makes at most
    MLX_MAX_CHUNKS chunks."""
    chunk = chunk_tokens(num_tokens, vocab_size, hidden_size, MLX_MIN_CHUNK_TOKENS)
    capped = 2 ** math.ceil(math.log2(max(1, math.ceil(num_tokens / MLX_MAX_CHUNKS))))
    return max(1, min(num_tokens, max(chunk, capped)))


def mlx_chunks(num_tokens: int, vocab_size: int, hidden_size: int) -> int:
    """The chunk the MLX engine's loss runs its head in for `num_tokens` tokens (mlx_chunk_tokens), or 0 where it
    runs the head over all the tokens at once (fewer than MLX_MIN_CHUNKS chunks: memfit.mlx.loss says how)."""
    chunk = mlx_chunk_tokens(num_tokens, vocab_size, hidden_size)
    return chunk if math.ceil(num_tokens / chunk) >= MLX_MIN_CHUNKS else 0
