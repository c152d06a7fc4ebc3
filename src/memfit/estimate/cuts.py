"""The dynamic terms, traced: one training micro-step of cuts of the real architecture on fake tensors
(memfit.estimate.trace), kept in memory and on disk (memfit.cache), extrapolated per decoder layer to the whole
depth, and served from lines in the batch where the traces were found on them."""

from __future__ import annotations

import copy

from memfit import cache
from memfit.config import TrainConfig
from memfit.errors import MemfitError, UserError
from memfit.estimate.dtypes import Precision
from memfit.estimate.peaks import PeakLines, TracePeak, peaks_from_json, peaks_to_json
from memfit.libraries import import_peft
from memfit.models.arch import ArchInfo

_TRACE_CACHE: dict[str, dict[str, TracePeak]] = {}
# Traces this process ran (cache misses): tests and benchmarks/estimate_speed.py read it.
TRACE_STATS = {"traced": 0, "from_disk": 0}
# Settings no trace reads (the loop, the optimizer, the guard, the data, how processes shard): left out of the key
# so that estimates differing only in them share their traces. The batch size is keyed on its own; everything
# else (a new field too) is in the key.
NOT_TRACED = frozenset({
    "batch_size", "grad_accum", "optimizer", "lr", "warmup_steps", "max_steps", "epochs", "max_grad_norm", "seed",
    "packing", "group_by_length", "compile", "log_every", "distributed", "offload", "max_memory", "memory_threshold",
    "memory_report_interval", "save_every", "keep_checkpoints", "memory_sample_interval", "eval_every",
    "tensorboard", "supervise", "max_restarts", "reload_interval", "lora_layers", "max_host_memory",
})


def _cut_config(hf_config, num_layers: int):
    cut = copy.deepcopy(hf_config)
    text = cut.get_text_config() if hasattr(cut, "get_text_config") else cut
    depth = _attr_depth(text)
    for name in ("num_hidden_layers", "n_layer"):
        if hasattr(text, name):
            setattr(text, name, num_layers)
    # Per-layer lists (gemma-2's sliding/global `layer_types`, deepseek-v4's `mlp_layer_types`, ...) must match the
    # new depth: any list as long as the model is deep.
    per_layer = [name for name, value in vars(text).items() if isinstance(value, list) and depth > 1
                 and len(value) == depth]
    for name in dict.fromkeys(["layer_types", *per_layer]):
        value = getattr(text, name, None)
        if isinstance(value, list) and value:
            try:
                setattr(text, name, [value[i % len(value)] for i in range(num_layers)])
            except AttributeError:  # a read-only property computed from the depth (mamba): already cut
                pass
    return cut


def _attr_depth(text_config) -> int:
    for name in ("num_hidden_layers", "n_layer"):
        if isinstance(getattr(text_config, name, None), int):
            return getattr(text_config, name)
    return 0


def _trace_key(hf_config, config: TrainConfig, precision: Precision, num_layers: int | tuple[int, ...],
               batch_size: int | str, kind: str = "trace") -> str:
    settings = config.model_dump(exclude=set(NOT_TRACED & set(TrainConfig.model_fields)))
    if config.quant == "none":
        settings.pop("qlora_upcast", None)  # it changes nothing without a k-bit base: those traces are shared
    return cache.digest(kind, cache.config_key(hf_config), settings, precision, num_layers,
                        batch_size)


def _cached_cut(key: str) -> dict[str, TracePeak] | None:
    if key not in _TRACE_CACHE:
        stored = cache.load("trace", key)
        if stored is None:
            return None
        TRACE_STATS["from_disk"] += 1
        _TRACE_CACHE[key] = peaks_from_json(stored)
    return _TRACE_CACHE[key]


def trace_cut(hf_config, config: TrainConfig, precision: Precision, num_layers: int,
               batch_size: int) -> dict[str, TracePeak]:
    """One cut of the model traced at one batch size: from this process, else the disk cache, else traced."""
    key = _trace_key(hf_config, config, precision, num_layers, batch_size)
    if _cached_cut(key) is None:
        if cache.is_record(hf_config):
            raise cache.CacheMiss(f"no cached trace of {num_layers} layers at batch {batch_size}")
        import torch

        # Building the cut (weight init, LoRA init) draws from the global RNG, and only on a cache miss: keep it
        # off the caller's stream, or a training run's dropout masks would depend on what was estimated before.
        with torch.random.fork_rng(devices=[]):
            try:
                _TRACE_CACHE[key] = _trace_cut_uncached(hf_config, config, precision.torch(), num_layers,
                                                        batch_size)
            except (MemfitError, cache.CacheMiss, KeyboardInterrupt, MemoryError):
                raise
            except Exception as error:  # noqa: BLE001 - the model's own code failing on fake tensors
                raise _untraceable(hf_config, error) from None
        TRACE_STATS["traced"] += 1
        cache.save("trace", key, peaks_to_json(_TRACE_CACHE[key]))
    return _TRACE_CACHE[key]


def _untraceable(hf_config, error: Exception) -> UserError:
    """One line for a model whose training step cannot run on fake tensors (the estimate needs that trace)."""
    import transformers

    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    first = " ".join(str(error).split())[:160] or type(error).__name__
    if "does not support gradient checkpointing" in first or "does not support activation checkpointing" in first:
        return UserError(f"model_type {getattr(text, 'model_type', '?')!r} does not support gradient checkpointing "
                         f"in transformers {transformers.__version__}", hint="pass --no-grad-checkpointing")
    return UserError(
        f"cannot estimate model_type {getattr(text, 'model_type', '?')!r}: its training step does not run on fake "
        f"tensors with transformers {transformers.__version__} ({type(error).__name__}: {first})",
        hint="`memfit probe` measures what fits by running real steps; docs/benchmarks.md lists the architectures "
             "estimated (python benchmarks/architecture_sweep.py)",
    )


def _trace_cut_uncached(hf_config, config: TrainConfig, precision, num_layers: int,
                        batch_size: int) -> dict[str, TracePeak]:
    """`precision`: memfit.precision.Precision (torch dtypes)."""
    import logging

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    # A step that cannot run on fake tensors becomes one line (`_untraceable`); torch would first log the failing
    # meta kernel's traceback. Set here: importing torch resets its loggers' levels.
    logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)

    from memfit.models.arch import build_meta_model, decoder_layers
    from memfit.estimate.trace import fakeify_, trace_step
    from memfit.train.model import attn_implementation

    cut = _cut_config(hf_config, num_layers)
    cut.use_cache = False

    model = build_meta_model(cut, attn_implementation=attn_implementation(config))
    if config.method == "full":
        model.to(precision.trainable_dtype)
    else:
        model.to(precision.frozen_dtype)
        if config.quant != "none":
            # Emulate a k-bit base: matmuls dequantize to the compute dtype; the rest stays in the frozen dtype
            # (memfit.train.model.prepare_kbit), or is fp32 after prepare_model_for_kbit_training (--qlora-upcast).
            if config.qlora_upcast:
                for name, param in model.named_parameters():
                    if param.dim() < 2 or "embed" in name or "lm_head" in name or "wte" in name or "wpe" in name:
                        param.data = param.data.to(torch.float32)
            if config.quant == "4":
                _dequantized_on_access(model)
    for param in model.parameters():
        param.requires_grad_(config.method == "full")
    head = model.get_output_embeddings()
    last_layer = decoder_layers(model)[-1]
    if config.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.uses_adapters:
            model.enable_input_require_grads()
    if config.uses_adapters:
        import_peft()
        from memfit.train.model import apply_lora

        adapted = config.model_copy(update={"lora_layers": None})
        model = apply_lora(model, adapted, precision)
    from memfit.train.gated_mlp import fuse_gated_mlps
    from memfit.train.rms_norm import fuse_rms_norms

    fuse_gated_mlps(model)  # as memfit.train.model.load_model does
    fuse_rms_norms(model)
    model.train()
    fake_mode = FakeTensorMode()
    fakeify_(model, fake_mode)
    text = cut.get_text_config() if hasattr(cut, "get_text_config") else cut
    from memfit.train.chunked_loss import chunked_loss_blocker

    chunked = config.chunked_loss and chunked_loss_blocker(model) is None
    return trace_step(model, fake_mode, batch_size, config.seq_len, text.vocab_size, precision.compute_dtype,
                      precision.autocast, head=head, last_layer=last_layer, chunked_loss=chunked)


def _dequantized_on_access(model) -> None:
    """4-bit fused experts (memfit.train.experts) are a bitsandbytes parametrization: each time the experts run,
    their weights are dequantized into a new 16-bit tensor, which the expert matmul keeps for backward. Make the
    traced model do the same (a copy per access, of the frozen dtype), so the trace counts those copies."""
    import torch
    from torch.nn.utils import parametrize

    from memfit.train.experts import fused_expert_weights

    class Dequantize(torch.nn.Module):
        def forward(self, stored):
            with torch.no_grad():
                return stored.clone()

    for weight in fused_expert_weights(model):
        parametrize.register_parametrization(weight.module, weight.param_name, Dequantize(), unsafe=True)


def layer_period(hf_config) -> int:
    """After how many decoder layers the layer kinds repeat (gemma-2: sliding, global → 2; gemma-3: 5 sliding + 1
    global → 6; most models: 1), from the config's `layer_types`. No repeat: the number of layers."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    kinds = getattr(text, "layer_types", None)
    if kinds is None and isinstance(getattr(hf_config, "text_config", None), dict):  # a cached record
        kinds = hf_config.text_config.get("layer_types")
    if not isinstance(kinds, list) or not kinds:
        return 1
    for period in range(1, len(kinds) // 2 + 1):
        if all(kind == kinds[index % period] for index, kind in enumerate(kinds)):
            return period
    return len(kinds)


def cuts_of(hf_config, info: ArchInfo) -> tuple[int, ...]:
    """The cuts traced: one period of layers and two (1 and 2 layers for most models), or the whole model when it
    is no deeper than that. Against a trace of the whole depth (`python benchmarks/trace_cuts.py`, docs/
    benchmarks.md "Which cuts of a model the estimator traces"; smollm2-135m, llama-3.2-1b, gemma-2-2b) these cuts
    gave the same bytes in most settings and erred over, never under (at most +0.65% at seq 1024, +13% once at
    seq 2048), as the 2- and 4-layer cuts did (+8.9%, +13%), at about 3/4 of their time."""
    period = layer_period(hf_config)
    return (info.num_layers,) if info.num_layers <= 2 * period else (period, 2 * period)


def cut_lines(hf_config, config: TrainConfig, precision: Precision, num_layers: int) -> PeakLines:
    """One cut's peaks as lines in the batch size, through its traces at batch 1 and 2."""
    return PeakLines(trace_cut(hf_config, config, precision, num_layers, 1),
                     trace_cut(hf_config, config, precision, num_layers, 2))


_LINES_HOLD: dict[str, int] = {}


def lines_hold_to(hf_config, info: ArchInfo, config: TrainConfig, precision: Precision) -> int:
    """The largest batch at which every cut's trace was found on its lines through batch 1 and 2, byte for byte
    (0: none). A cut's phase peak is the highest of the live bytes after each op of the step, each of which grows
    linearly in the batch (a fixed sequence of ops): a convex function of the batch. One that meets a line at 1,
    2 and N is that line from 1 to N, so every batch up to N is served from the lines, exactly as its traces
    would be (`solve_max_batch` records N when its check finds that)."""
    key = _trace_key(hf_config, config, precision, cuts_of(hf_config, info), "-", kind="lines")
    if key not in _LINES_HOLD:
        stored = cache.load("lines", key)
        _LINES_HOLD[key] = int(stored) if isinstance(stored, int) else 0
    return _LINES_HOLD[key]


def record_lines_held(hf_config, info: ArchInfo, config: TrainConfig, precision: Precision,
                      batch_size: int) -> None:
    """Record that the traces at `batch_size` lie on the lines (checked by the caller), if that is news."""
    if batch_size > lines_hold_to(hf_config, info, config, precision):
        key = _trace_key(hf_config, config, precision, cuts_of(hf_config, info), "-", kind="lines")
        _LINES_HOLD[key] = batch_size
        cache.save("lines", key, batch_size)


def traced_peaks(hf_config, info: ArchInfo, config: TrainConfig, precision: Precision,
                 batch_size: int) -> dict[str, TracePeak]:
    """Peak of one micro-step for the whole depth, from traces of two cuts (`cuts_of`).

    Decoder layers are identical (or alternate with period 2), so the saved activations grow by the same amount
    per layer; only layers that train (or lie after one that trains) hold activations for backward.
    """
    cuts = cuts_of(hf_config, info)
    trained_layers = info.num_layers
    if config.uses_adapters and config.lora_layers:
        trained_layers = min(config.lora_layers, info.num_layers)
    held_to = lines_hold_to(hf_config, info, config, precision) if batch_size > 2 else 0

    def cut_at(num_layers: int) -> dict[str, TracePeak]:
        key = _trace_key(hf_config, config, precision, num_layers, batch_size)
        if batch_size <= held_to and _cached_cut(key) is None:
            return cut_lines(hf_config, config, precision, num_layers).at(batch_size)
        return trace_cut(hf_config, config, precision, num_layers, batch_size)

    if len(cuts) == 1:
        return cut_at(info.num_layers)
    short, long = cuts
    low = cut_at(short)
    high = cut_at(long)
    extra = (trained_layers - short) / (long - short)

    def grow(a: int, b: int) -> int:
        return max(0, int(a + (b - a) * extra))

    return {
        phase: TracePeak(
            activations=grow(low[phase].activations, high[phase].activations),
            logits=grow(low[phase].logits, high[phase].logits),
            gradients=grow(low[phase].gradients, high[phase].gradients),
        )
        for phase in low
    }
