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
