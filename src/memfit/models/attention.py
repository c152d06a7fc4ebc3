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

Attention by segment (`SEGMENTED`, what training runs where the model would run sdpa): the block-diagonal mask keeps
samples apart but not cheap, since SDPA's kernels compute every query x key block of the row and mask afterwards (a
row of 512 tokens costs the same with one sample as with five; on CPU `is_causal=True` does not skip the upper
half either). `sdpa_by_segment` runs SDPA causally on each segment alone, given the segments' bounds
(`cu_seq_lens_q`, flash-attention's varlen convention over the flattened batch, from `segment_bounds`): the same
result (it is each sample alone, as the checks above compare) for the blocks that count. Forward + backward of one
layer of smollm2-135m's attention over 2 rows of 512 tokens holding documents of 200, 180 and 132 tokens, one CPU
thread: 45.6 ms masked, 19.4 ms by segment; rows of one document each: 36.3 and 35.4 ms (`python
benchmarks/layer_kernels.py --repeats 5 --iterations 20 --write`, docs/benchmarks.md).
Without bounds, with a sliding window, soft-capping, a position bias, attention sinks or a KV cache it is
transformers' sdpa with the mask transformers built (registered for this name as for sdpa), so nothing changes
where segments do not apply.
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

SEGMENTED = "memfit_sdpa_by_segment"
# None: not chosen yet; transformers then picks sdpa where the model has it, else eager. SEGMENTED is sdpa wherever
# it does not run by segment, and each segment alone where it does.
_CHECKED_IMPLEMENTATIONS = frozenset({None, "eager", "sdpa", SEGMENTED})
# What sdpa_by_segment leaves to transformers' sdpa: the kwargs that change the attention within a segment.
_WITHIN_SEGMENT = ("softcap", "position_bias", "s_aux")


def packing_isolated(model_or_config: Any) -> bool:
    """True when a forward with `position_ids=batch.position_ids, attention_mask=None, use_cache=False` keeps packed
    samples apart for this model (a transformers model, a PEFT wrapper of one, or a config)."""
    config = getattr(model_or_config, "config", model_or_config)
    return (
        getattr(config, "model_type", None) in ISOLATING_TYPES
        and getattr(config, "_attn_implementation", None) in _CHECKED_IMPLEMENTATIONS
    )


def segment_bounds(position_ids) -> Any:
    """`cu_seq_lens_q` for `sdpa_by_segment`: where each segment starts in the flattened (B*S) batch, and B*S at the
    end (int64, on the CPU: it is read as numbers, never computed on). A segment starts at every row start and
    wherever a position is not its predecessor's + 1, the rule transformers reads packed rows by (collate restarts
    the positions at every sample and at the padding)."""
    import torch

    rows, length = position_ids.shape
    positions = position_ids.cpu()
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    flat = starts.reshape(-1).nonzero().squeeze(1)
    return torch.cat([flat, torch.tensor([rows * length])])


def sdpa_by_segment(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                    cu_seq_lens_q=None, sliding_window: int | None = None, **kwargs):
    """transformers' attention interface: (B, S, heads, head_dim) from query (B, heads, S, d) and key/value
    (B, kv_heads, S, d), SDPA causal over each segment alone (see the module docstring)."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward, use_gqa_in_sdpa

    batch, heads, length, head_dim = query.shape
    if (cu_seq_lens_q is None or sliding_window is not None or key.shape[2] != length or length < 2
            or not getattr(module, "is_causal", True) or any(kwargs.get(name) is not None for name in _WITHIN_SEGMENT)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    gqa = {}
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1 and use_gqa_in_sdpa(None, key, value):
        gqa = {"enable_gqa": True}
    elif groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    bounds = cu_seq_lens_q.tolist()
    if len(bounds) == batch + 1:  # one segment per row: one causal call over the batch (a call per row costs 6% more)
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling, is_causal=True,
                                              **gqa).transpose(1, 2).contiguous(), None
    pieces = []
    for row in range(batch):
        # This row's segment lengths; every row start is a bound, so a segment never crosses rows.
        first, last = bounds.index(row * length), bounds.index((row + 1) * length)
        lengths = [end - start for start, end in zip(bounds[first:last], bounds[first + 1:last + 1])]
        # split, not slicing: its backward is one concatenation, where slices each add into a zeroed full gradient.
        for q, k, v in zip(*(t[row:row + 1].split(lengths, dim=2) for t in (query, key, value))):
            pieces.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True,
                                                         **gqa).transpose(1, 2))
    return torch.cat(pieces, dim=1).view(batch, length, heads, value.shape[-1]), None


def register_segmented_attention() -> None:
    """Make SEGMENTED a name transformers knows: the attention function, and sdpa's mask builder for the fallback."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SEGMENTED, sdpa_by_segment)
    AttentionMaskInterface.register(SEGMENTED, sdpa_mask)


def use_segmented_attention(model) -> bool:
    """Switch a model that runs sdpa, of a type that keeps packed samples apart, to SEGMENTED; True when it runs
    SEGMENTED now. Packed batches then need `cu_seq_lens_q` (memfit.train.validation.model_inputs)."""
    base = getattr(model, "get_base_model", lambda: model)()
    config = getattr(base, "config", None)
    if getattr(config, "_attn_implementation", None) == SEGMENTED:
        return True
    if (getattr(config, "_attn_implementation", None) != "sdpa" or config.model_type not in ISOLATING_TYPES
            or not hasattr(base, "set_attn_implementation")):
        return False
    register_segmented_attention()
    base.set_attn_implementation(SEGMENTED)
    return config._attn_implementation == SEGMENTED


def runs_by_segment(model) -> bool:
    """Whether `model` (a PEFT, DDP or compile wrapper of one too) runs SEGMENTED attention."""
    for attribute in ("module", "_orig_mod"):  # DDP/FSDP, torch.compile
        model = getattr(model, attribute, model)
    base = getattr(model, "get_base_model", lambda: model)()
    return getattr(getattr(base, "config", None), "_attn_implementation", None) == SEGMENTED


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
