"""Which engine shards a run on several processes, and how it is set up: DDP, FSDP2, DeepSpeed ZeRO 1/2/3.

`accelerator_kwargs` is what `memfit train` adds to `accelerate.Accelerator(...)`; `deepspeed_config` and
`fsdp_settings` are also what `memfit launch-config` writes to files (memfit.distributed.launch), so a run launched
with those files and one launched with plain torchrun set the engine up the same way: the training process always
builds its plugin from its own TrainConfig, the files tell the launcher how many processes to start and where.

The engines, for the memory they save (the estimator's terms, memfit.estimate.memory):
- ddp (and auto): every rank holds the whole model, its gradients and optimizer states; accelerate wraps the
  model in DistributedDataParallel when a launcher started several processes, so nothing is passed.
- fsdp: PyTorch FSDP2 (`fully_shard`), FULL_SHARD (parameters resharded after forward), one unit per decoder layer.
  The training process applies it itself (memfit.distributed.fsdp, on CUDA and on CPU over gloo): accelerate's
  plugin, which `accelerator_kwargs` still describes for `memfit launch-config` and its launcher, is not passed.
  FSDP2 shards parameter by parameter, so LoRA's trainable adapters and the frozen base mix in one unit without
  FSDP1's `use_orig_params` and PEFT's wrap policy. `--offload cpu` keeps the sharded parameters, gradients and
  optimizer states in CPU RAM (the optimizer steps there).
- zero1/zero2/zero3: DeepSpeed partitions the optimizer states, + the gradients, + the parameters. `--offload cpu`
  puts the optimizer states (all stages) and, with ZeRO-3, the parameters in CPU RAM.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING, Any

from memfit.config import TrainConfig
from memfit.errors import UserError

if TYPE_CHECKING:  # memfit.precision imports torch: `memfit estimate` reads estimated_sharding without it
    from memfit.precision import Precision

DEEPSPEED_EXTRA = "pip install 'memfit[deepspeed]'"
# FSDP2: parameters are DTensors sharded one by one (torch.distributed.fsdp.fully_shard).
FSDP_VERSION = 2
# Each rank writes its own shard of the model and optimizer (torch.distributed.checkpoint): no rank ever gathers
# the whole model to save it. Resuming reads the shards back with the same number of ranks.
FSDP_STATE_DICT_TYPE = "SHARDED_STATE_DICT"
# DeepSpeed prints throughput every this many steps; memfit's metrics do that job.
DEEPSPEED_STEPS_PER_PRINT = 1_000_000_000


def engine_name(config: TrainConfig) -> str:
    """ddp, fsdp or deepspeed: which engine `config.distributed` selects (auto is DDP)."""
    if config.distributed.startswith("zero"):
        return "deepspeed"
    return "fsdp" if config.distributed == "fsdp" else "ddp"


def zero_stage(config: TrainConfig) -> int:
    """The DeepSpeed ZeRO stage of `--distributed zeroN`; 0 for the other engines."""
    return int(config.distributed[-1]) if config.distributed.startswith("zero") else 0


def estimated_sharding(config: TrainConfig, zero: int = 0) -> tuple[int, str]:
    """The estimator's (ZeRO stage, layout) for this engine (memfit.estimate.memory.Hardware's `zero` and
    `engine`): `--distributed zeroN` is stage N, fsdp's FULL_SHARD partitions what ZeRO-3 does in FSDP's layout;
    an explicit `zero` (estimate's --zero) wins over the engine's own stage."""
    if config.distributed == "fsdp":
        return (3 if zero in (0, 3) else zero), "fsdp"
    return (zero or zero_stage(config)), "deepspeed"


def shards_weights(config: TrainConfig) -> bool:
    """Whether the base weights themselves are split across ranks (FSDP, ZeRO-3), not only training states."""
    return config.distributed in ("fsdp", "zero3")


def deepspeed_installed() -> bool:
    # find_spec, not import: importing deepspeed takes a second and logs its accelerator choice to the terminal.
    return importlib.util.find_spec("deepspeed") is not None


def _world_size(world_size: int | None) -> int:
    if world_size is not None:
        return world_size
    from memfit.distributed.ranks import current

    return current().world_size


def _default_device() -> str:
    from memfit.runtime import default_device

    return default_device()


def check_combination(config: TrainConfig, device: str, world_size: int) -> None:
    """Refuse engine settings that cannot work together, with one line that says what to use instead. Pure: it
    looks at no installed package and no environment (`memfit launch-config` checks a run for other machines)."""
    distributed, engine = config.distributed, engine_name(config)
    if config.offload == "cpu" and engine == "ddp":
        raise UserError(f"--offload cpu needs a sharding engine, not --distributed {distributed}: DDP keeps every "
                        "state on each GPU", hint="use --distributed zero2 --offload cpu, zero3 or fsdp")
    if engine == "ddp":
        return
    if engine == "deepspeed" and device != "cuda":
        # DeepSpeed's CPU accelerator needs Intel's extension for PyTorch, and its ops are built for CUDA.
        raise UserError(f"--distributed {distributed} (DeepSpeed) trains on CUDA GPUs only, not on {device}",
                        hint="use --distributed fsdp or ddp on CPU (torchrun --nproc-per-node N -m memfit train ...)")
    if engine == "fsdp" and world_size > 1 and device not in ("cuda", "cpu"):
        raise UserError(f"--distributed fsdp shards over CUDA (NCCL) or CPU (gloo) processes, not {device}",
                        hint="use --device cuda or cpu")
    if engine == "fsdp" and world_size > 1 and device == "cpu" and config.offload == "cpu":
        raise UserError("--offload cpu on CPU processes: their shards are in CPU RAM already",
                        hint="drop --offload cpu")
    if engine == "fsdp" and world_size > 1 and config.dtype == "fp16":
        raise UserError("--dtype fp16 with --distributed fsdp: memfit's FSDP path has no loss scaler for sharded "
                        "gradients", hint="use --dtype bf16 (or fp32)")
    if engine == "fsdp" and world_size == 1 and config.offload == "cpu":
        raise UserError("--distributed fsdp --offload cpu needs several processes: one process is not sharded and "
                        "would keep everything on the GPU",
                        hint="launch with torchrun --nproc-per-node N, or on one GPU use --distributed zero3 "
                             "--offload cpu")
    if config.quant == "8" and shards_weights(config):
        raise UserError(f"--quant 8 cannot be sharded by --distributed {distributed}: bitsandbytes' int8 weights "
                        "are not floating-point tensors FSDP/ZeRO-3 can split",
                        hint="use --quant 4 (QLoRA, sharded with its storage in the compute dtype) or "
                             "--distributed ddp/zero2")
    if config.offload == "cpu" and config.optimizer == "adamw8bit":
        raise UserError("--optimizer adamw8bit with --offload cpu: offloaded optimizer states step on the CPU, and "
                        "bitsandbytes' 8-bit optimizer steps on the GPU",
                        hint="use --optimizer adamw with --offload cpu (or keep adamw8bit without offload)")


def check_runtime(config: TrainConfig) -> None:
    """What this process needs for its engine: DeepSpeed installed, and a launcher configured for the same engine
    (an `accelerate launch` config of another engine sets variables that would fight memfit's plugin)."""
    engine = engine_name(config)
    if engine == "deepspeed" and not deepspeed_installed():
        raise UserError(f"--distributed {config.distributed} needs DeepSpeed, which is not installed",
                        hint=f"{DEEPSPEED_EXTRA} (on every node), or use --distributed fsdp")
    launched = {"deepspeed": os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true",
                "fsdp": os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"}
    for launcher_engine, on in launched.items():
        if on and engine != launcher_engine:
            raise UserError(f"launched with an accelerate config for {launcher_engine.upper()} but --distributed is "
                            f"{config.distributed}",
                            hint="pass the --distributed the config was written for (memfit launch-config prints "
                                 "the matching command)")


def check_engine(config: TrainConfig, device: str | None = None, world_size: int | None = None) -> None:
    """Every check `memfit train` makes before it loads anything: one UserError line (exit 2) when the engine
    cannot run here. `device` None is the device train would pick; `world_size` None is the launcher's."""
    # What cannot work here at all first: installing DeepSpeed would not make it train on a CPU.
    check_combination(config, device or _default_device(), _world_size(world_size))
    check_runtime(config)


# --- FSDP ---------------------------------------------------------------------------------------------------------


def decoder_layer_classes(model_config) -> list[str] | None:
    """The class names FSDP wraps one unit each: the causal-LM class's `_no_split_modules` (LlamaDecoderLayer, ...).
    None when unknown: accelerate then reads the same attribute from the loaded model."""
    if model_config is None:
        return None
    from transformers import AutoModelForCausalLM

    try:
        model_class = AutoModelForCausalLM._model_mapping[type(model_config)]
    except KeyError:
        return None
    names = getattr(model_class, "_no_split_modules", None)
    return list(names) if names else None


def fsdp_settings(config: TrainConfig, precision: Precision, model_config=None) -> dict[str, Any]:
    """`FullyShardedDataParallelPlugin` keyword arguments, plain values only (the launch config writes them too).

    The mixed-precision policy is not here: it is a torch object (see `fsdp_mixed_precision`)."""
    return {
        "fsdp_version": FSDP_VERSION,
        "reshard_after_forward": True,  # FULL_SHARD: a layer's full weights live only while it computes
        "auto_wrap_policy": "transformer_based_wrap",
        "transformer_cls_names_to_wrap": decoder_layer_classes(model_config),
        "cpu_offload": config.offload == "cpu",
        "state_dict_type": FSDP_STATE_DICT_TYPE,
        # memfit loads the model on every rank and moves it to its GPU before sharding; rank-0-only loading
        # (meta tensors elsewhere) would need the model kept on CPU until prepare.
        "cpu_ram_efficient_loading": False,
        # --grad-checkpointing is the model's own (gradient_checkpointing_enable); FSDP's would wrap it twice.
        "activation_checkpointing": False,
    }


def fsdp_mixed_precision(precision: Precision):
    """Gathered parameters in the compute dtype, gradients reduced in fp32 (the sharded trainable parameters stay
    fp32: memfit's mixed-precision contract, the same as one process's fp32 master weights). None without autocast
    (fp32, bf16-pure: parameters already have the dtype they compute in)."""
    if not precision.autocast:
        return None
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=precision.compute_dtype, reduce_dtype=torch.float32)


def quant_storage_dtype(config: TrainConfig, precision: Precision):
    """The dtype bitsandbytes packs 4-bit weights in. FSDP and ZeRO-3 split floating-point tensors of one dtype, so
    when they shard a QLoRA base its storage must be the compute dtype (PEFT's FSDP-QLoRA and DeepSpeed-QLoRA
    recipes); elsewhere uint8 (what one process has always used)."""
    import torch

    if config.quant == "4" and shards_weights(config):
        return precision.compute_dtype
    return torch.uint8


# --- DeepSpeed ----------------------------------------------------------------------------------------------------


def deepspeed_config(config: TrainConfig, precision: Precision, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for this run, every value concrete (no "auto": deepspeed's own config class and a
    `deepspeed` launcher read it as it is).

    Batch terms match memfit's: `--batch-size` rows per rank per micro-step, `--grad-accum` micro-steps per
    optimizer step. Precision: bf16/fp16 run a 16-bit model with fp32 master weights inside DeepSpeed's optimizer
    (fp16 with dynamic loss scaling); bf16-pure is a bf16 model too; fp32 turns both off. The optimizer is memfit's
    own (AdamW, 8-bit AdamW, ...), wrapped by DeepSpeed: with offload it steps on the CPU partitions, so DeepSpeed's
    demand for its compiled CPU Adam is turned off (`zero_force_ds_cpu_optimizer`)."""
    stage = zero_stage(config)
    if stage == 0:
        raise UserError(f"--distributed {config.distributed} is not a DeepSpeed ZeRO stage",
                        hint="use --distributed zero1, zero2 or zero3")
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 2:
        # Gradients reduce while backward still runs, into one contiguous buffer (no fragmentation).
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_scatter=True)
    if config.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        # accelerator.get_state_dict gathers 16-bit weights to rank 0 for saving (the adapter, or the full model).
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "train_batch_size": config.batch_size * config.grad_accum * world_size,
        "gradient_clipping": float(config.max_grad_norm),  # 0 turns clipping off, as --max-grad-norm 0 does
        "zero_optimization": zero,
        "bf16": {"enabled": precision.name in ("bf16", "bf16-pure")},
        "fp16": {"enabled": precision.name == "fp16"},
        "zero_allow_untested_optimizer": True,  # memfit's optimizers are torch's, bitsandbytes' or transformers'
        "steps_per_print": DEEPSPEED_STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }
    if precision.name == "fp16":
        ds["fp16"].update(loss_scale=0, initial_scale_power=16, loss_scale_window=1000, hysteresis=2,
                          min_loss_scale=1)
    if config.offload == "cpu":
        ds["zero_force_ds_cpu_optimizer"] = False
    return ds


# --- the Accelerator ----------------------------------------------------------------------------------------------


def accelerator_kwargs(config: TrainConfig, device: str, model_config=None,
                       world_size: int | None = None) -> dict[str, Any]:
    """Extra keyword arguments for `accelerate.Accelerator(...)` that set up `config.distributed`.

    {} for ddp/auto (accelerate wraps the model in DDP by itself when a launcher started several processes) and
    for fsdp in one process; `fsdp_plugin=` for fsdp on several (what a launcher configured for FSDP builds;
    the training loop does not pass it: memfit.distributed.fsdp shards the model itself); `deepspeed_plugin=` for zero1/2/3 (DeepSpeed runs
    even in one process: ZeRO-Offload on one GPU is a use of its own). `model_config` (the transformers config)
    names the decoder layer FSDP wraps; without it accelerate takes it from the model. Raises UserError for a
    setting that cannot run here (see `check_engine`)."""
    world = _world_size(world_size)
    check_engine(config, device, world)
    engine = engine_name(config)
    from memfit.precision import resolve_precision

    precision = resolve_precision(config.dtype, device)
    if engine == "fsdp" and world > 1:
        from accelerate import FullyShardedDataParallelPlugin

        settings = fsdp_settings(config, precision, model_config)
        return {"fsdp_plugin": FullyShardedDataParallelPlugin(
            **settings, mixed_precision_policy=fsdp_mixed_precision(precision))}
    if engine == "deepspeed":
        from accelerate import DeepSpeedPlugin

        # zero3_init_flag: from_pretrained builds the model inside deepspeed.zero.Init, each rank materialising
        # only its partition (a 70B model never exists whole on one GPU).
        return {"deepspeed_plugin": DeepSpeedPlugin(hf_ds_config=deepspeed_config(config, precision, world),
                                                    zero3_init_flag=zero_stage(config) == 3)}
    return {}
