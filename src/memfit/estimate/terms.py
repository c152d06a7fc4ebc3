"""The terms that do not grow with the batch: weights, adapters, gradients and optimizer states, per device, as the
engine lays them out (ZeRO/FSDP sharding, CPU offload)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from memfit.config import TrainConfig
from memfit.errors import UserError
from memfit.estimate.dtypes import Precision
from memfit.estimate.hardware import Hardware
from memfit.models.arch import ArchInfo
from memfit.units import GB

# DeepSpeed ZeRO-3 keeps the layer being computed and the prefetched next one gathered.
ZERO3_GATHERED_LAYERS = 2


def _nf4_bytes(weights: int) -> float:
    # 4 bits per weight; one absmax per 64-weight block, itself 8-bit quantized with an fp32 constant per 256 blocks.
    return weights * 0.5 + weights / 64 + weights / (64 * 256) * 4


def _int8_bytes(weights: int, rows: int) -> float:
    return weights + rows * 4  # LLM.int8: one byte per weight and an fp32 scale per output row


def weight_bytes(info: ArchInfo, config: TrainConfig, precision: Precision) -> int:
    if config.method == "full":
        return info.params * precision.trainable_bytes
    if config.quant == "none":
        return info.params * precision.frozen_bytes
    rows = sum(linear.out_features for linear in info.linears)
    quantized = _nf4_bytes(info.linear_weight_params) if config.quant == "4" else _int8_bytes(
        info.linear_weight_params, rows)
    # Fused experts: nf4 with --quant 4, left in the frozen dtype with --quant 8 (memfit.train.experts).
    experts = _nf4_bytes(info.expert_params) if config.quant == "4" else info.expert_params * precision.frozen_bytes
    rest = info.params - info.linear_weight_params - info.expert_params  # embeddings, norms, head, routers
    return int(quantized + experts + rest * unquantized_bytes(config, precision))


def unquantized_bytes(config: TrainConfig, precision: Precision) -> int:
    """Bytes per weight of a k-bit base's unquantized params (embeddings, norms, lm_head): the dtype they were loaded
    in (memfit.train.model.prepare_kbit), or fp32 after `--qlora-upcast` (PEFT's prepare_model_for_kbit_training)."""
    return 4 if config.qlora_upcast else precision.frozen_bytes


def trainable_shapes(info: ArchInfo, config: TrainConfig) -> list[tuple[int, ...]]:
    if config.method == "full":
        return list(info.param_shapes)
    from memfit.train.experts import EXPERTS_TARGET, experts_targeted

    shapes: list[tuple[int, ...]] = []
    linear_targets = config.lora_targets
    if experts_targeted(config.lora_targets):
        # PEFT's target_parameters: A (r x experts, in) and B (out, r x experts) per fused expert weight.
        for weight in info.expert_targets(config.lora_layers):
            rank = config.lora_rank * weight.num_experts
            shapes += [(rank, weight.in_features), (weight.out_features, rank)]
        named = [t.strip() for t in config.lora_targets.split(",") if t.strip() and t.strip() != EXPERTS_TARGET]
        if not named:
            return shapes
        linear_targets = ",".join(named)
    for linear in info.lora_targets(linear_targets, config.lora_layers):
        shapes += [(config.lora_rank, linear.in_features), (linear.out_features, config.lora_rank)]
    return shapes


def optimizer_state_bytes(name: str, shapes: list[tuple[int, ...]], state_bytes: int) -> int:
    """Bytes of optimizer state for parameters of these shapes, states kept at `state_bytes` per element."""
    total = 0
    for shape in shapes:
        numel = math.prod(shape)
        if name == "adamw":
            total += 2 * numel * state_bytes
        elif name == "adamw8bit":
            # bitsandbytes keeps tensors under 4096 elements in 32-bit; others blockwise 8-bit (absmax per 256).
            total += 2 * numel * 4 if numel < 4096 else 2 * (numel + math.ceil(numel / 256) * 4)
        elif name == "adafactor":
            # Factored second moment for matrices (row and column sums), full for vectors; no first moment.
            if len(shape) >= 2:
                total += (numel // shape[-1] + numel // shape[-2]) * state_bytes
            else:
                total += numel * state_bytes
        elif name == "sgd":
            total += 0
    return total


def kbit_layout_note(config: TrainConfig, precision: Precision) -> str:
    """The notes line of a k-bit base: how it is stored, and which dtype its unquantized weights are in."""
    base = ("4-bit nf4 base with double quantization" if config.quant == "4"
            else "8-bit base (bitsandbytes LLM.int8)")
    if config.qlora_upcast:
        return (f"{base}; embeddings, norms and lm_head in fp32 (--qlora-upcast: PEFT's "
                "prepare_model_for_kbit_training)")
    kept = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[precision.frozen]
    return (f"{base}; embeddings, norms and lm_head in {kept}, the compute dtype (--qlora-upcast: fp32, as PEFT's "
            "prepare_model_for_kbit_training)")


@dataclass
class ModelStates:
    """Bytes per device of what the model keeps between steps (and, offloaded, in CPU RAM for all ranks)."""

    weights: int
    adapters: int
    gradients: int
    optimizer: int
    trainable: int  # trained parameters (a count, not bytes)
    host_offload: int = 0


def model_states(info: ArchInfo, config: TrainConfig, precision: Precision, hardware: Hardware,
                 notes: list[str]) -> ModelStates:
    """The static terms on one device of `hardware`: unsharded, then as ZeRO/FSDP shards and offloads them."""
    shapes = trainable_shapes(info, config)
    trainable = sum(math.prod(shape) for shape in shapes)
    states = ModelStates(
        weights=weight_bytes(info, config, precision),
        adapters=trainable * precision.trainable_bytes if config.uses_adapters else 0,
        gradients=trainable * precision.trainable_bytes,
        optimizer=optimizer_state_bytes(config.optimizer, shapes, precision.trainable_bytes),
        trainable=trainable)
    if hardware.engine == "fsdp" and hardware.zero != 3:
        raise UserError(f"FSDP shards fully (counted as ZeRO-3), not at ZeRO-{hardware.zero}",
                        hint="drop --zero with fsdp")
    if hardware.zero >= 1:
        _shard(states, info, config, precision, hardware, notes)
    if hardware.offload == "cpu":
        _offload(states, info, precision, hardware, notes)
    return states


def _shard(states: ModelStates, info: ArchInfo, config: TrainConfig, precision: Precision, hardware: Hardware,
           notes: list[str]) -> None:
    shards = max(1, hardware.num_gpus)
    zero = hardware.zero
    fsdp = hardware.engine == "fsdp"
    trainable = states.trainable
    # DeepSpeed's layout: 16-bit model and gradients, fp32 master weights inside the optimizer.
    if precision.autocast and not fsdp:
        trained_model_bytes = trainable * precision.compute_bytes
        if config.method == "full":
            states.weights = info.params * precision.compute_bytes
        else:
            states.adapters = trained_model_bytes
        states.gradients = trainable * precision.compute_bytes
        states.optimizer += trainable * 4
        notes.append("ZeRO with mixed precision: 16-bit weights and gradients, fp32 master copy in the optimizer")
    elif precision.autocast:
        notes.append("FSDP with mixed precision: fp32 sharded trained weights, gradients and optimizer states; "
                     "layers gathered in 16-bit")
    states.optimizer //= shards
    if zero >= 2:
        states.gradients //= shards
    if zero >= 3:
        gathered = ZERO3_GATHERED_LAYERS * info.largest_layer_params * precision.compute_bytes
        states.weights = states.weights // shards + gathered
        states.adapters //= shards
        engine = "FSDP (FULL_SHARD)" if fsdp else "ZeRO-3"
        notes.append(f"{engine} partitions weights {shards} ways and gathers {ZERO3_GATHERED_LAYERS} layers at a "
                     "time")


def _offload(states: ModelStates, info: ArchInfo, precision: Precision, hardware: Hardware,
             notes: list[str]) -> None:
    shards = max(1, hardware.num_gpus)
    if hardware.zero == 0:
        notes.append("--offload cpu needs --zero 1, 2 or 3 (DeepSpeed); ignored")
        return
    states.host_offload += states.optimizer * shards
    states.optimizer = 0
    if hardware.engine == "fsdp":
        # FSDP's CPU offload holds the sharded gradients there too (the optimizer steps on the CPU).
        states.host_offload += (states.gradients + states.adapters) * shards
        states.gradients = states.adapters = 0
    if hardware.zero >= 3:
        states.host_offload += states.weights * shards
        states.weights = ZERO3_GATHERED_LAYERS * info.largest_layer_params * precision.compute_bytes
    notes.append(f"offloaded to CPU RAM (all ranks): {states.host_offload / GB:.1f} GB")
