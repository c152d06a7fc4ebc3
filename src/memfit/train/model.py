"""Load a model for training as the config asks: dtype, 4/8-bit base, LoRA adapters, gradient checkpointing.

Memory options, next to the code that implements them:
- `--dtype`: see memfit.precision. A full fine-tune under mixed precision loads fp32 weights (they are the master
  copy); LoRA loads the frozen base in the 16-bit compute dtype and keeps adapters fp32 (PEFT's default).
- `--method qlora`: bitsandbytes nf4 with double quantization (or 8-bit with `--quant 8`). The non-quantized params
  (embeddings, norms, lm_head) stay in the dtype they were loaded in, the compute dtype (torchtune's, unsloth's and
  LitGPT's layout); `--qlora-upcast` runs PEFT's `prepare_model_for_kbit_training` instead, which casts them to
  fp32. Either way the base is frozen and, with checkpointing, the embeddings' output requires grad (`prepare_kbit`).
- Mixture-of-experts weights (fused 3-D parameters): quantized by memfit, adapted only when named; see
  memfit.train.experts.
- `--lora-layers N`: adapters only on the last N decoder layers (earlier layers need no activation gradients).
- `--grad-checkpointing`: non-reentrant checkpointing of each decoder layer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from memfit.config import TrainConfig
from memfit.errors import UserError
from memfit.precision import Precision


def attn_implementation(config: TrainConfig) -> str | None:
    """None lets transformers choose: SDPA where the architecture supports it (memory-efficient), else eager."""
    return None if config.attn_implementation == "auto" else config.attn_implementation


def quantization_config(config: TrainConfig, precision: Precision):
    if config.quant == "none":
        return None
    from transformers import BitsAndBytesConfig

    from memfit.distributed.engines import quant_storage_dtype

    if config.quant == "8":
        return BitsAndBytesConfig(load_in_8bit=True)
    # uint8, except where FSDP/ZeRO-3 shard the 4-bit base: they split tensors of one floating-point dtype.
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=precision.compute_dtype,
        bnb_4bit_quant_storage=quant_storage_dtype(config, precision),
    )


def load_dtype(config: TrainConfig, precision: Precision) -> torch.dtype:
    """The dtype weights are loaded in (before adapters are added)."""
    return precision.trainable_dtype if config.method == "full" else precision.frozen_dtype


def lora_target_modules(model: torch.nn.Module, config: TrainConfig, allow_none: bool = False) -> list[str]:
    """Names of the linear modules to adapt: all linear layers of the decoder (never lm_head), or the listed ones,
    restricted to the last `lora_layers` decoder layers. `allow_none`: the experts are targeted, so no linear
    layer is fine."""
    from memfit.models.arch import decoder_layer_index, is_adaptable_linear
    from memfit.train.experts import EXPERTS_TARGET

    wanted = None
    if config.lora_targets != "all-linear":
        wanted = {name.strip() for name in config.lora_targets.split(",") if name.strip()} - {EXPERTS_TARGET}
    num_layers = model.config.get_text_config().num_hidden_layers
    first_layer = num_layers - config.lora_layers if config.lora_layers else 0
    targets = []
    for name, module in model.named_modules():
        layer = decoder_layer_index(name)
        if layer is None or layer < first_layer or not is_adaptable_linear(module):
            continue
        if wanted is not None and name.rsplit(".", 1)[-1] not in wanted:
            continue
        targets.append(name)
    if not targets and not allow_none:
        known = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if is_adaptable_linear(module)})
        raise UserError(
            f"--lora-targets {config.lora_targets!r} matches no linear layer of this model",
            hint=f"use all-linear or some of: {','.join(known)}",
        )
    return targets


def apply_lora(model: torch.nn.Module, config: TrainConfig, precision: Precision) -> torch.nn.Module:
    from memfit.libraries import import_peft

    import_peft()  # first, where this process said it needs no bitsandbytes (memfit.libraries)
    from peft import LoraConfig, get_peft_model

    from memfit.train.experts import expert_lora_parameters

    num_layers = model.config.get_text_config().num_hidden_layers
    first_layer = num_layers - config.lora_layers if config.lora_layers else 0
    expert_params = expert_lora_parameters(model, config.lora_targets, config.quant, first_layer)
    lora_config = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.effective_lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=lora_target_modules(model, config, allow_none=bool(expert_params)),
        target_parameters=expert_params or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    # Adapters stay fp32 under mixed precision (stable updates for tiny matrices); bf16-pure casts them too.
    model = get_peft_model(model, lora_config, autocast_adapter_dtype=precision.name != "bf16-pure")
    if precision.name == "bf16-pure":
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    from memfit.train.lora_linear import fuse_lora_linears

    fuse_lora_linears(model)  # after every cast: a layer is fused only when its tensors share one dtype
    return model


def load_pretrained(model_class, model_dir: Path, **kwargs):
    """`model_class.from_pretrained(model_dir)` offline; damaged weight files that the check before loading did not
    catch (memfit.models.resolve.check_weights) are one WeightsDamagedError line naming the file, not a traceback."""
    from memfit.models.resolve import weights_load_error

    try:
        return model_class.from_pretrained(str(model_dir), local_files_only=True, **kwargs)
    except Exception as error:
        damaged = weights_load_error(error, Path(model_dir))
        if damaged is None:
            raise
        raise damaged from None


def load_model(model_dir: Path, config: TrainConfig, precision: Precision, device: str = "cpu",
               notify: Callable[[str], None] | None = None):
    """The model ready to train: weights on `device`, adapters attached, checkpointing on when asked. `notify`
    gets one line for what was done that the user would not guess (mixture-of-experts weights)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # its "Loading weights" bar would write to the user's terminal
    quant = quantization_config(config, precision)
    if attn_implementation(config) is not None:
        from memfit.models.attention import check_attn_implementation
        from memfit.models.resolve import load_config

        check_attn_implementation(load_config(Path(model_dir)), attn_implementation(config))
    kwargs = dict(dtype=load_dtype(config, precision), attn_implementation=attn_implementation(config))
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device if device != "cuda" else torch.cuda.current_device()}
    model = load_pretrained(AutoModelForCausalLM, model_dir, **kwargs)
    if quant is None:
        model.to(device)
    model.config.use_cache = False  # the KV cache is for generation; in training it only holds memory
    if quant is not None:
        from memfit.train.experts import fused_expert_weights, quantize_experts_4bit

        experts = fused_expert_weights(model)
        if experts and config.quant == "4":
            count = quantize_experts_4bit(model, device if device != "cuda" else torch.cuda.current_device())
            _say(notify, f"experts: {count:,} parameters in {len(experts)} fused weights quantized to nf4 "
                         "(bitsandbytes parametrization), frozen")
        elif experts:
            frozen = str(precision.frozen_dtype).removeprefix("torch.")
            _say(notify, f"experts: {len(experts)} fused weights kept in {frozen} and frozen "
                         "(bitsandbytes has no 8-bit form for them)")
        model = prepare_kbit(model, config)
    if config.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.uses_adapters:
        model = apply_lora(model, config, precision)
        from memfit.train.experts import experts_targeted

        if experts_targeted(config.lora_targets):
            _say(notify, f"experts: LoRA rank {config.lora_rank} on every expert of the fused expert weights "
                         "(PEFT target_parameters)")
    elif config.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
    from memfit.train.gated_mlp import fuse_gated_mlps
    from memfit.train.rms_norm import fuse_rms_norms

    fuse_gated_mlps(model)
    fuse_rms_norms(model)
    if not config.compile:  # its loop over segments would break the compiled graph at every layer
        from memfit.models.attention import use_segmented_attention

        use_segmented_attention(model)
    return model


def prepare_kbit(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    """A k-bit base made ready for adapters. By default what PEFT's `prepare_model_for_kbit_training` (0.21) does
    besides its fp32 cast: every base parameter frozen; with gradient checkpointing, a hook that makes the input
    embeddings' output require grad (`enable_input_require_grads`, which PEFT installs whenever it is not told
    `use_reentrant=False`: kept, so both layouts run the same graph) and checkpointing on (load_model sets it up).
    The embeddings, norms and lm_head keep the dtype they were loaded in: the compute dtype (bf16/fp16; fp32 under
    --dtype fp32). `--qlora-upcast` (config.qlora_upcast) runs PEFT's function itself, which casts them to fp32;
    the fused experts are kept out of that cast (memfit.train.experts)."""
    if config.qlora_upcast:
        from peft import prepare_model_for_kbit_training

        from memfit.train.experts import kept_out_of_kbit_cast

        with kept_out_of_kbit_cast(model):
            return prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.grad_checkpointing)
    for param in model.parameters():
        param.requires_grad_(False)
    if config.grad_checkpointing:
        model.enable_input_require_grads()
    return model


def _say(notify: Callable[[str], None] | None, line: str) -> None:
    if notify is not None:
        notify(line)
