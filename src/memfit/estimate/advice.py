"""What to change when a training configuration does not fit: the cheapest change, or combination, that does.

Each knob is one change to what the user asked for, with a cost that ranks how much it changes their training.
Changes that keep the math come first (the same model, data and update, only slower or sharded), then changes that
alter what is trained:

  cost  knob                                                      keeps the math?
     1  smaller micro-batch + more grad accumulation              yes (the same effective batch)
     2  --grad-checkpointing                                      yes (recomputes activations: ~30% more compute)
     3  --zero N (more ZeRO sharding, several GPUs)               yes (more communication)
     4  --optimizer adamw8bit (CUDA)                              nearly (8-bit blockwise Adam states)
     5  --zero 2|3 --offload cpu (CUDA, DeepSpeed)                yes (the optimizer steps on the CPU: slow)
     7  --no-qlora-upcast (from --qlora-upcast, 16-bit compute)   nearly (embeddings, norms, lm_head in 16-bit)
     8  --dtype bf16 (from fp32)                                  nearly (mixed precision, fp32 master weights)
    10  --dtype bf16-pure (full fine-tune)                        no (no fp32 master copy)
    15  --lora-rank r/2                                           no (smaller adapters)
    20  --seq-len s/2, 24: s/4                                    no (shorter samples)
    25  --lora-layers n/2                                         no (adapts only the last layers)
    30  --method qlora (from lora)                                no (4-bit base)
    40  --method lora (from full), 45: --method qlora (from full) no (adapters instead of every weight)

A combination costs the sum of its knobs, and combinations (up to three knobs, at most one of each kind) are
estimated cheapest first; the search stops at the first few that fit, and skips any that contain one that
already fits (more change for nothing). A knob that alone saves less than 1% of the total is left out of the
combinations and of the answer. When a combination fits only with a smaller micro-batch, the micro-batch is the
largest that then fits and the accumulation keeps the effective batch.

Every estimate here reuses the traces of the estimates before it (memfit.estimate.memory caches them per setting):
knobs that no trace reads (batch accumulation, optimizer, sharding, offload, LoRA layers) cost arithmetic only.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any

from memfit.config import TrainConfig
from memfit.errors import UserError
from memfit.estimate.memory import Hardware, estimate_memory, resolve_dtypes, solve_max_batch

# A change saving less than this share of the total is not worth a row (nor a place in a combination).
MIN_SAVING_SHARE = 0.01
# How many fitting answers to look for, and how many combinations to estimate at most while looking.
MAX_FITTING = 3
MAX_COMBINATIONS = 24
MAX_KNOBS = 3


@dataclass(frozen=True, eq=False)  # compared and hashed by identity (its dicts are not hashable)
class Knob:
    kind: str  # at most one knob of a kind in a combination
    flags: str
    why: str
    cost: int
    update: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields
    hardware: dict[str, Any] = field(default_factory=dict)  # Hardware fields


@dataclass(frozen=True)
class Suggestion:
    change: str  # the flags to use
    why: str
    total_bytes: int  # per device with that change
    saving_bytes: int
    fits: bool = False
    max_batch_size: int = 0  # with the change: the largest micro-batch that fits (0: it does not fit)
    cost: int = 0  # how much it changes the training (the module's table), summed over its knobs

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"change": self.change, "why": self.why, "total_bytes": self.total_bytes,
                                "saving_bytes": self.saving_bytes, "fits": self.fits, "cost": self.cost}
        if self.fits:
            data["max_batch_size"] = self.max_batch_size
        return data


def knobs(hf_config, config: TrainConfig, hardware: Hardware) -> list[Knob]:
    """The single changes that apply to this configuration on this hardware, cheapest first."""
    from memfit.models.arch import arch_info

    found: list[Knob] = []
    effective = config.batch_size * config.grad_accum
    if config.batch_size > 1:
        found.append(Knob("batch", f"--batch-size 1 --grad-accum {effective}",
                          "same effective batch, smaller micro-batch", 1,
                          {"batch_size": 1, "grad_accum": effective}))
    if not config.grad_checkpointing:
        found.append(Knob("checkpointing", "--grad-checkpointing", "recompute activations in backward", 2,
                          {"grad_checkpointing": True}))
    found += _engine_knobs(config, hardware)
    precision = resolve_dtypes(config.dtype, hardware.device).name
    if precision == "fp32":
        found.append(Knob("dtype", "--dtype bf16", "bf16 mixed precision (fp32 master weights)", 8,
                          {"dtype": "bf16"}))
    if config.method == "full" and precision != "bf16-pure":
        found.append(Knob("dtype", "--dtype bf16-pure", "weights, gradients and optimizer states in bf16", 10,
                          {"dtype": "bf16-pure"}))
    if config.uses_adapters and config.quant != "none" and config.qlora_upcast and precision != "fp32":
        found.append(Knob("upcast", "--no-qlora-upcast", "embeddings, norms and lm_head in the compute dtype, not "
                          "fp32", 7, {"qlora_upcast": False}))
    if config.uses_adapters and config.lora_rank >= 8:
        found.append(Knob("rank", f"--lora-rank {config.lora_rank // 2}", "smaller adapters", 15,
                          {"lora_rank": config.lora_rank // 2}))
    if config.seq_len >= 256:
        found.append(Knob("seq", f"--seq-len {config.seq_len // 2}", "shorter sequences", 20,
                          {"seq_len": config.seq_len // 2}))
        found.append(Knob("seq", f"--seq-len {config.seq_len // 4}", "much shorter sequences", 24,
                          {"seq_len": config.seq_len // 4}))
    layers = config.lora_layers or arch_info(hf_config).num_layers
    if config.uses_adapters and layers > 2:
        found.append(Knob("layers", f"--lora-layers {layers // 2}",
                          "adapt only the last layers (no activations kept below)", 25, {"lora_layers": layers // 2}))
    if config.method == "lora":
        found.append(Knob("method", "--method qlora", "4-bit base weights + LoRA", 30,
                          {"method": "qlora", "quant": "4"}))
    if config.method == "full":
        found.append(Knob("method", "--method lora", "train adapters, freeze the base", 40,
                          {"method": "lora", "quant": "none"}))
        found.append(Knob("method", "--method qlora", "4-bit base weights + LoRA adapters", 45,
                          {"method": "qlora", "quant": "4"}))
    return found


def _engine_knobs(config: TrainConfig, hardware: Hardware) -> list[Knob]:
    """The changes of how the GPUs hold the model states: ZeRO stages, an 8-bit optimizer, CPU offload."""
    found: list[Knob] = []
    cuda = hardware.device == "cuda"
    deepspeed = hardware.engine != "fsdp"
    if hardware.num_gpus > 1 and cuda and deepspeed:
        for stage in range(hardware.zero + 1, 4):
            found.append(Knob("sharding", f"--zero {stage}", f"ZeRO-{stage}: partition more model states across "
                              f"the {hardware.num_gpus} GPUs (train: --distributed zero{stage})",
                              3 + (stage - hardware.zero - 1), {}, {"zero": stage}))
    if config.optimizer == "adamw" and cuda and config.offload == "none":
        found.append(Knob("optimizer", "--optimizer adamw8bit", "8-bit optimizer states (bitsandbytes)", 4,
                          {"optimizer": "adamw8bit"}))
    if cuda and hardware.offload == "none" and (deepspeed or hardware.num_gpus > 1):
        if hardware.zero >= 1 or not deepspeed:
            found.append(Knob("offload", "--offload cpu", "optimizer states (and sharded weights) in CPU RAM", 5,
                              {"offload": "cpu"}, {"offload": "cpu"}))
        else:  # DeepSpeed offloads from ZeRO 1 up; on one GPU too (train: --distributed zeroN --offload cpu)
            for stage, cost, what in ((2, 5, "optimizer states"), (3, 6, "optimizer states and weights")):
                found.append(Knob("offload", f"--zero {stage} --offload cpu",
                                  f"DeepSpeed ZeRO-{stage} offload: {what} in CPU RAM (train: --distributed "
                                  f"zero{stage} --offload cpu)", cost, {"offload": "cpu"},
                                  {"zero": stage, "offload": "cpu"}))
    return found


def _compatible(combination: tuple[Knob, ...]) -> bool:
    kinds = [knob.kind for knob in combination]
    if len(set(kinds)) != len(kinds):
        return False
    flags = {knob.kind: knob for knob in combination}
    if "optimizer" in flags and "offload" in flags:
        return False  # bitsandbytes' 8-bit optimizer steps on the GPU; offloaded states step on the CPU
    if "sharding" in flags and "offload" in flags and "zero" in flags["offload"].hardware:
        return False
    if "method" in flags and "dtype" in flags and flags["dtype"].update.get("dtype") == "bf16-pure":
        return False  # bf16-pure is offered for full fine-tuning
    return True


def _apply(config: TrainConfig, hardware: Hardware, combination: tuple[Knob, ...]) -> tuple[TrainConfig, Hardware]:
    update: dict[str, Any] = {}
    hardware_update: dict[str, Any] = {}
    for knob in combination:
        update.update(knob.update)
        hardware_update.update(knob.hardware)
    return config.updated(**update), replace(hardware, **hardware_update)


def suggestions(hf_config, config: TrainConfig, hardware: Hardware, current_total: int, *,
                max_fitting: int = MAX_FITTING, max_combinations: int = MAX_COMBINATIONS) -> list[Suggestion]:
    """What to change when a configuration does not fit: the cheapest changes or combinations that fit (cheapest
    first, each with the largest micro-batch it then allows), then the single changes that do not fit alone,
    largest saving first. Rows saving less than 1% of `current_total` are left out."""
    available = knobs(hf_config, config, hardware)
    floor = current_total * MIN_SAVING_SHARE
    totals: dict[tuple[Knob, ...], int | None] = {}

    def total_of(combination: tuple[Knob, ...]) -> int | None:
        if combination not in totals:
            changed, changed_hardware = _apply(config, hardware, combination)
            try:
                totals[combination] = estimate_memory(hf_config, changed, changed_hardware).total_bytes
            except (ValueError, UserError):  # a change that does not apply to this model or config
                totals[combination] = None
        return totals[combination]

    budget = hardware.memory_bytes
    singles = {knob: total_of((knob,)) for knob in available}
    # Knobs worth combining: those that save at least 1% alone. The batch knob saves nothing at batch 1 of a
    # configuration that only fits with a smaller batch, so it always stays.
    useful = [knob for knob in available if singles[knob] is not None
              and (knob.kind == "batch" or current_total - singles[knob] >= floor)]
    combinations = [combination for size in range(1, MAX_KNOBS + 1)
                    for combination in itertools.combinations(useful, size) if _compatible(combination)]
    combinations.sort(key=lambda combination: (sum(knob.cost for knob in combination), len(combination)))

    fitting: list[tuple[Knob, ...]] = []
    tried = 0
    for combination in combinations:
        if len(fitting) >= max_fitting:
            break
        if any(set(found) <= set(combination) for found in fitting):
            continue  # contains a combination that fits already: more change for nothing
        if len(combination) > 1:
            if tried >= max_combinations:
                break
            tried += 1
        total = total_of(combination)
        if total is not None and total <= budget:
            fitting.append(combination)

    result = [_fitting_row(hf_config, config, hardware, current_total, combination) for combination in fitting]
    shown = {row.change for row in result}
    alone = []
    for knob, total in singles.items():
        if total is None or knob.flags in shown or current_total - total < floor:
            continue
        alone.append(Suggestion(knob.flags, knob.why, total, current_total - total, total <= budget,
                                0, knob.cost))
    alone.sort(key=lambda row: -row.saving_bytes)
    return result + [row for row in alone if not row.fits]


def _fitting_row(hf_config, config: TrainConfig, hardware: Hardware, current_total: int,
                 combination: tuple[Knob, ...]) -> Suggestion:
    """A combination that fits, as a row: with the batch knob, the largest micro-batch up to the one asked for
    (and the accumulation that keeps the effective batch); without it, the largest batch it allows."""
    cost = sum(knob.cost for knob in combination)
    others = tuple(knob for knob in combination if knob.kind != "batch")
    changed, changed_hardware = _apply(config, hardware, others)
    flags = [knob.flags for knob in others]
    why = "; ".join(knob.why for knob in others)
    if len(others) < len(combination):
        effective = config.batch_size * config.grad_accum
        largest = max(1, solve_max_batch(hf_config, changed, changed_hardware, limit=config.batch_size).batch)
        # The largest micro-batch that fits and divides the effective batch, so that it stays exactly the same.
        micro = max(size for size in range(1, largest + 1) if effective % size == 0)
        accum = effective // micro
        flags.append(f"--batch-size {micro} --grad-accum {accum}")
        why = "; ".join(filter(None, [why, f"micro-batch {micro} × {accum} accumulation steps (effective batch "
                                           f"{micro * accum})"]))
        changed = changed.updated(batch_size=micro, grad_accum=accum)
        total = estimate_memory(hf_config, changed, changed_hardware).total_bytes
    else:
        total = estimate_memory(hf_config, changed, changed_hardware).total_bytes
        largest = solve_max_batch(hf_config, changed, changed_hardware).batch
    return Suggestion(" ".join(flags), why, total, current_total - total, True, largest, cost)
