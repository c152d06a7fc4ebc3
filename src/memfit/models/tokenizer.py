"""A small byte-level BPE tokenizer trained offline on memfit's built-in corpus.

Random-init models (`memfit init-model`) need a tokenizer that works without the network; byte-level BPE encodes
any text, so the corpus only decides which merges exist, not what can be encoded.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

MAX_TOKENIZER_VOCAB = 4096

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Order fixes the ids: 0 endoftext, 1 pad, 2 im_start, 3 im_end.
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, IM_START, IM_END)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def corpus_text() -> str:
    """The built-in English corpus (original prose, ~35 KB) shipped as package data."""
    return resources.files("memfit").joinpath("data/corpus.txt").read_text(encoding="utf-8")


@functools.lru_cache(maxsize=8)
def _trained_json(vocab_size: int) -> str:
    # Cached as JSON, not as an object, so every caller gets its own mutable tokenizer.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Paragraph by paragraph: counts are the same as for the whole text, and training stays single-input.
    tok.train_from_iterator([p for p in corpus_text().split("\n\n") if p.strip()], trainer=trainer)
    return tok.to_str()


def train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with ChatML specials; at most min(vocab_size, 4096) tokens (fewer if the corpus runs out
    of merges). Deterministic: the same vocab_size always gives the same tokenizer."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    # 256 byte symbols + the specials is the least a byte-level BPE can have.
    floor = 256 + len(SPECIAL_TOKENS)
    if vocab_size < floor:
        raise ValueError(f"vocab_size must be >= {floor} for a byte-level tokenizer, got {vocab_size}")
    backend = Tokenizer.from_str(_trained_json(min(vocab_size, MAX_TOKENIZER_VOCAB)))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
