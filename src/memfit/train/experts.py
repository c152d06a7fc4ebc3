"""Mixture-of-experts weights under QLoRA and LoRA.

transformers 5 stores each layer's experts as two fused 3-D parameters (`experts.gate_up_proj`, `experts.down_proj`,
experts x out x in) instead of one nn.Linear per expert. What the libraries do with them (checked with
transformers 5.24, bitsandbytes 0.50, PEFT 0.21 on tiny Mixtral and Qwen3-MoE models, tests/test_moe.py):

- bitsandbytes' 4/8-bit loading replaces nn.Linear only: the experts, nearly all of an MoE's weights, stay 16-bit,
  and `prepare_model_for_kbit_training` (run under `--qlora-upcast`: memfit.train.model.prepare_kbit) would then
  cast them to fp32 (Mixtral-8x7B: 180 GB). memfit quantizes them to nf4 itself with bitsandbytes' parametrization
  (`replace_parameter_4bit`: dequantized one layer at a time when the experts run), and keeps them out of that
  cast with `--quant 8` (bitsandbytes has no 8-bit form). Without the flag nothing is cast: frozen, they keep the
  dtype they were loaded in, either way.
- PEFT's "all-linear" does not reach them; `target_parameters` puts LoRA on a fused expert weight (rank r per
  expert), but not on a 4-bit one (PEFT 0.21 raises inside its parametrization). So `--lora-targets experts`
  adapts them with `--method lora` and is refused with `--quant 4`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from memfit.errors import UserError

if TYPE_CHECKING:
    import torch

EXPERTS_TARGET = "experts"  # the --lora-targets word for the fused expert weights


@dataclass(frozen=True)
class FusedExpertWeight:
    module_name: str  # model.layers.3.mlp.experts
    param_name: str  # gate_up_proj
    module: torch.nn.Module

    @property
    def name(self) -> str:
        return f"{self.module_name}.{self.param_name}"


def fused_expert_weights(model: torch.nn.Module) -> list[FusedExpertWeight]:
    """The fused expert weights of the decoder layers (memfit.models.arch.fused_expert_params), not yet
    quantized."""
    from memfit.models.arch import decoder_layer_index, fused_expert_params

    return [FusedExpertWeight(module_name, name, module)
            for module_name, module in model.named_modules() if decoder_layer_index(module_name) is not None
            for name, _ in fused_expert_params(module)]


def experts_targeted(lora_targets: str) -> bool:
    return EXPERTS_TARGET in {name.strip() for name in lora_targets.split(",")}


def quantize_experts_4bit(model: torch.nn.Module, device: str) -> int:
    """Quantize every fused expert weight to nf4 (double-quantized absmax, as the linear layers) on `device`, one
    weight at a time, so the quantizer's temporaries are those of one weight. The weights arrive there in 16-bit,
    all of them: the loading peak the estimator counts (load_peak_bytes, estimate/memory.py). Returns the number of
    expert parameters quantized."""
    import torch
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    count = 0
    for weight in fused_expert_weights(model):
        param = getattr(weight.module, weight.param_name)
        count += param.numel()
        if param.device.type != torch.device(device).type:
            param.data = param.data.to(device)
        replace_parameter_4bit(weight.module, weight.param_name, compress_statistics=True, quant_type="nf4")
    return count


@contextmanager
def kept_out_of_kbit_cast(model: torch.nn.Module):
    """`prepare_model_for_kbit_training` (`--qlora-upcast`) casts every 16-bit parameter to fp32; the experts
    (frozen, and the bulk of the model) are lifted off their modules while it runs and put back as they were."""
    lifted = []
    for weight in fused_expert_weights(model):
        if weight.param_name in weight.module._parameters:
            lifted.append((weight.module, weight.param_name, weight.module._parameters.pop(weight.param_name)))
    try:
        yield
    finally:
        for module, name, param in lifted:
            param.requires_grad_(False)
            module._parameters[name] = param


def expert_lora_parameters(model: torch.nn.Module, lora_targets: str, quant: str,
                           first_layer: int = 0) -> list[str]:
    """PEFT `target_parameters` (full names) for `--lora-targets ...,experts`; [] when experts are not named."""
    if not experts_targeted(lora_targets):
        return []
    from memfit.models.arch import decoder_layer_index

    if quant == "4":  # checked first: by now the experts are quantized, no longer plain 3-D parameters
        raise UserError(
            "--lora-targets experts with a 4-bit base: PEFT cannot put LoRA on 4-bit expert weights",
            hint="drop 'experts' from --lora-targets (the experts stay frozen in 4-bit), or use --method lora",
        )
    weights = [w for w in fused_expert_weights(model) if (decoder_layer_index(w.module_name) or 0) >= first_layer]
    if not weights:
        raise UserError(f"--lora-targets {lora_targets!r} names experts, but this model has no fused expert weights",
                        hint="drop 'experts' from --lora-targets (it is for mixture-of-experts models)")
    return [w.name for w in weights]
