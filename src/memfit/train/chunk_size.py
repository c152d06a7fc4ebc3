"""How many tokens one chunk of the chunked loss holds (torch's memfit.train.chunked_loss, MLX's memfit.mlx.loss,
and the estimators of both). No torch here: the MLX estimate imports it."""

from __future__ import annotations

import math

# Below this many tokens a chunk's matmuls get inefficient: on 2 CPU cores, 1,100 tokens through a 49k-vocab head
# took 3.1 s in chunks of 8, 1.3 s in chunks of 64, 1.0 s in chunks of 256 (full logits: 1.0 s); with a 152k
# vocab, 18.7 s / 5.8 s / 4.5 s (full: 6.3 s). A 256-token chunk of fp32 logits is 128-156 MB for 128-152k vocabs.
MIN_CHUNK_TOKENS = 256


def chunk_tokens(num_tokens: int, vocab_size: int, hidden_size: int) -> int:
    """Tokens per chunk so one chunk's logits are about the size of all the hidden states (Liger's rule), but not
    fewer than MIN_CHUNK_TOKENS."""
    chunks = math.ceil(vocab_size / hidden_size)
    liger = 2 ** math.ceil(math.log2(max(1, math.ceil(num_tokens / chunks))))
    return max(1, min(num_tokens, max(liger, MIN_CHUNK_TOKENS)))


def even_chunk_tokens(num_tokens: int, vocab_size: int, hidden_size: int) -> int:
    """chunk_tokens spread evenly over as many chunks (torch's chunked loss): 345 tokens in chunks of 256 become
    173 + 172, not 256 + 89. The same matmuls, and a smaller largest chunk of logits, which is what the step's peak
    holds (qwen2.5-0.5b, 345 tokens: 105 MB of fp32 logits, not 156). MLX keeps chunk_tokens: its constants were
    fitted on those chunks (mlx_chunks)."""
    chunk = chunk_tokens(num_tokens, vocab_size, hidden_size)
    return math.ceil(num_tokens / math.ceil(num_tokens / chunk)) if num_tokens > 0 else chunk


# MLX: fewer chunks than this held more than the plain head. Measured with the chunks under a checkpoint, before
# the fused chunks of memfit.mlx.loss: MLX evaluates the step's graph as a whole, so more than one chunk was live at
# once; fitted on all of benchmarks/derive_mlx_constants.py's chunked runs then (1, 2 and 4 chunks;
# mlx_constants.json as of commit 9ab7840), the first two chunks' logits held 5.4x their fp32 size and the rest 1.8x,
# the full logits 4.1x. Break-even: 2 x 5.4 C + 1.8 (T - 2C) = 4.1 T at T = 3.1 chunks; below it the chunks held
# more and their checkpoint recomputed the head besides (a single chunk of smollm2-135m at 1 x 128 tokens: 739 MB
# against mlx-lm's 670, 0.88x its tokens/s: one round of benchmarks/mlx_vs_mlx_lm.py --preset smollm2-135m
# --batch-size 1 --seq-len 128). With the fused chunks (a frozen head: no recomputation), the same run with
# MLX_MIN_CHUNKS = 1, one fused chunk of 127 tokens: 4.34 tokens/s, MLX's peak 713 MB against the plain head's 670
# (4.31 tokens/s; docs/benchmarks.md's table). With MLX_MIN_CHUNKS = 2, two fused chunks of the tiny model at
# 2 x 256 (`mlx_vs_mlx_lm.py --preset tiny --batch-size 2 --seq-len 256 --steps 12 --repeats 1 --contenders
# memfit`): 29.9 MB at 444 tokens/s against the plain head's 39.3 MB at 448; but two fused chunks of the whole
# smollm2-135m at 2 x 256 (`--preset smollm2-135m --batch-size 2 --seq-len 256 --steps 4 --repeats 1 --contenders
# memfit`): 1,053 MB at 4.26 tokens/s against the plain head's 892 MB at 4.22. The rule stays at four.
MLX_MIN_CHUNKS = 4


def mlx_chunks(num_tokens: int, vocab_size: int, hidden_size: int) -> int:
    """The chunk the MLX engine's loss runs its head in for `num_tokens` tokens (chunk_tokens), or 0 where it runs
    the plain head: fewer than MLX_MIN_CHUNKS chunks."""
    chunk = chunk_tokens(num_tokens, vocab_size, hidden_size)
    return chunk if math.ceil(num_tokens / chunk) >= MLX_MIN_CHUNKS else 0
