"""Whether a model keeps the samples of a packed row from attending to each other.

transformers 5.x builds decoder attention masks in `masking_utils.create_causal_mask` (and its sliding-window
sibling). When the forward gets `attention_mask=None` and no KV cache, it reads sequence boundaries from
`position_ids` (a position that is not its predecessor + 1 starts a new sequence) and masks attention across them;
sliding windows are then measured in those restarted positions. `collate` gives positions that restart at every
segment and at the padding, so such a forward trains each packed sample as if it were alone in its row.

Verified, not assumed (transformers 5.23, torch 2.13, CPU, fp32): for every type in `ISOLATING_TYPES`, a 2-layer
model with tiny dims was run on a packed row [A (7 tokens) | B (5) | padding (3)] with position_ids
[0..6, 0..4, 0..2], attention_mask=None and use_cache=False, and its logits were compared with A and B run alone.
The memfit presets' types (llama, mistral, qwen2, phi3, gemma2, gpt2) were checked with each preset's own config
extras (llama3 rope scaling, soft-capping, ...) and with a 3-token sliding window where the type has one, so that
sliding layers see segments longer than their window. Every type matched to 3e-7 under both `eager` and `sdpa`
(gemma2 has no sdpa path in transformers 5.23: building one raises, so it runs eager only), while the same batch
with its 2D attention mask, as memfit packed before, was off by 0.01-0.46.
tests/test_packing_attention.py repeats the check for every type listed, through `collate`.

Two conditions the forward must meet, or samples leak into each other again:
- no KV cache: with `use_cache` left at the config default (True) the model creates an empty DynamicCache before
  building the mask, and create_causal_mask skips packed detection whenever there is a cache (every type above
  leaked, logits off by 0.05-0.3). Pass use_cache=False (memfit's training model also sets config.use_cache=False).
- no attention mask: with any 2D attention_mask the positions are ignored and the mask is plain causal + padding.

Everything else falls back (`packing_isolated` is False): model types not checked here, and attention
implementations other than eager and sdpa (flash_attention_2, flex_attention, kernels), which transformers may
well handle but memfit has not checked. The trainer then passes the attention mask as before, so a packed sample
can attend to the samples before it in its row, and warns.
"""

from __future__ import annotations

from typing import Any

# model_type values whose eager and sdpa forwards isolate packed sequences (see the module docstring).
ISOLATING_TYPES = frozenset({
    # memfit's preset architectures
    "llama", "mistral", "qwen2", "phi3", "gemma2", "gpt2",
    # other decoders people fine-tune, checked the same way
    "cohere", "gemma", "gemma3_text", "gpt_neox", "granite", "ministral", "mixtral", "olmo", "olmo2", "phi",
    "olmoe", "qwen2_moe", "qwen3", "qwen3_moe", "smollm3", "stablelm", "starcoder2",
})

# None: not chosen yet; transformers then picks sdpa where the model has it, else eager.
_CHECKED_IMPLEMENTATIONS = frozenset({None, "eager", "sdpa"})


def packing_isolated(model_or_config: Any) -> bool:
    """True when a forward with `position_ids=batch.position_ids, attention_mask=None, use_cache=False` keeps packed
    samples apart for this model (a transformers model, a PEFT wrapper of one, or a config)."""
    config = getattr(model_or_config, "config", model_or_config)
    return (
        getattr(config, "model_type", None) in ISOLATING_TYPES
        and getattr(config, "_attn_implementation", None) in _CHECKED_IMPLEMENTATIONS
    )


def _causal_lm_class(config: Any) -> type | None:
    """The transformers class `AutoModelForCausalLM.from_config(config)` builds, or None when there is none."""
    try:
        from transformers import CONFIG_MAPPING
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        config_class = type(config)
        if config_class not in MODEL_FOR_CAUSAL_LM_MAPPING:
            config_class = CONFIG_MAPPING[getattr(config, "model_type", None)]
        return MODEL_FOR_CAUSAL_LM_MAPPING[config_class]
    except Exception:  # no such model type, no causal-LM class, an older transformers layout: from_config says
        return None


def supported_attn_implementations(config: Any) -> list[str]:
    """Which of memfit's `--attn-implementation` choices this model's transformers class can run."""
    model_class = _causal_lm_class(config)
    choices = ["auto", "eager"]
    if model_class is None or getattr(model_class, "_supports_sdpa", False):
        choices.append("sdpa")
    return choices


def check_attn_implementation(config: Any, requested: str | None) -> None:
    """UserError naming the implementations that work, when transformers cannot build this model with `requested`
    (None: transformers chooses, which always works). Gemma-2 in transformers 5 is one: its class has no SDPA path
    (SDPA has no attention-logit soft-capping), and building it with attn_implementation="sdpa" raises."""
    if requested is None or requested in supported_attn_implementations(config):
        return
    from transformers import __version__

    from memfit.errors import UserError

    model_class = _causal_lm_class(config)
    name = model_class.__name__ if model_class is not None else getattr(config, "model_type", "this model")
    works = supported_attn_implementations(config)
    raise UserError(
        f"--attn-implementation {requested}: {name} ({getattr(config, 'model_type', '?')}) has no {requested} "
        f"attention in transformers {__version__}",
        f"use --attn-implementation {' or '.join(works)} (auto picks what the model supports)",
    )
