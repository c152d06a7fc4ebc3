"""FSDP2 at run time: memfit shards the model itself with `torch.distributed.fsdp.fully_shard`, on CPU (gloo) and CUDA.

Why not accelerate's FSDP plugin: accelerate 1.15 applies it only to GPU process types (on CPU processes it silently
trains DDP), and its prepare would own the wrapping, the gradient reduction and the state dicts this runtime needs
to control (the collective guard, the one-process checkpoint format). So the training process passes no plugin and
does not hand the model to `accelerator.prepare` (which would also wrap it in DDP): `shard` wraps each decoder layer
and then the root, as the plugin's transformer_based_wrap would (memfit.distributed.engines.fsdp_settings are the
same choices, written for the launcher by `memfit launch-config`).

Gradients. memfit's step objective is normalised over the global step's tokens, so the ranks' gradients must be
summed, not averaged: every FSDP unit reduces with a divide factor of 1. Each micro-batch's backward reduce-scatters
its gradients into the sharded ones (FSDP's default), so accumulation holds only the gradient shard, the memory the
estimator counts for --distributed fsdp; skipping the reduction until the last micro-batch
(`set_requires_gradient_sync(False)`) would keep every unit's unsharded gradients alive for the whole step.
Measured both ways on 2 gloo ranks (smollm2-135m's shapes, 4 layers, LoRA r16, 4 micro-batches of 1 a step, 8
steps, twice each): 2.84/2.87 s against 2.85/2.82 s per step, peak RSS within 5 MB, the same losses; for adapters
the choice does not show, for a full fine-tune the per-micro-batch reduction keeps the gradient memory sharded.

Checkpoints are the one-process format (memfit.train.checkpoint): the trainable tensors and the optimizer state are
gathered to rank 0 as full state dicts (`get_model_state_dict` / `get_optimizer_state_dict`, a collective on all
ranks), the optimizer's FQN keys turned back into the parameter indices `optimizer.state_dict()` uses. Resuming,
every rank reads the files and `set_model_state_dict` / `set_optimizer_state_dict` keep each rank's shard. For a
very large full fine-tune, gathering everything to rank 0 costs its whole size in rank 0's CPU RAM: a sharded
(torch.distributed.checkpoint) checkpoint would avoid that; it is not built.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch

from memfit.config import TrainConfig
from memfit.distributed.collective import all_reduce_sum
from memfit.distributed.single import OneProcessEngine
from memfit.precision import Precision


def decoder_layer_names(model: torch.nn.Module) -> set[str]:
    """The decoder layer classes of the transformers model inside `model` (PEFT wraps it): `_no_split_modules`."""
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if names:
            return set(names)
    return set()


def shard(model: torch.nn.Module, config: TrainConfig, precision: Precision) -> int:
    """Fully shard `model` in place over the default process group: one unit per decoder layer, then the root
    (embeddings, final norm, head). Returns how many units there are. Build the optimizer afterwards: sharding
    replaces the parameters with DTensors."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    from memfit.distributed.engines import fsdp_mixed_precision

    policy = fsdp_mixed_precision(precision) or MixedPrecisionPolicy()
    offload = CPUOffloadPolicy() if config.offload == "cpu" else OffloadPolicy()
    names = decoder_layer_names(model)
    layers = [module for module in model.modules() if type(module).__name__ in names]
    units = []
    for layer in layers:
        units.append(fully_shard(layer, reshard_after_forward=True, mp_policy=policy, offload_policy=offload))
    # The root stays gathered after forward (FSDP2's own choice for it): the chunked loss uses the head's weight
    # after the model returns, and backward needs it at once anyway.
    units.append(fully_shard(model, reshard_after_forward=False, mp_policy=policy, offload_policy=offload))
    for unit in units:
        unit.set_gradient_divide_factor(1.0)  # a sum over the ranks (see the module docstring)
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
    return len(units)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch's clipping on the sharded gradients (DTensors: the norm is reduced over the ranks); the norm as a
    plain tensor, the same on every rank."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def _full_options(**extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **extra)


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


def gather_trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors, whole, on rank 0's CPU ({} on the other ranks). A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_full_options(cpu_offload=True, ignore_frozen_params=True))
    wanted = set(trainable_names(model))
    return {name: tensor.contiguous() for name, tensor in state.items() if name in wanted}


def gather_model(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0's CPU (a full fine-tune's final/). A collective.

    A tied weight (lm_head = embed_tokens) comes back under each of its names as separate tensors, which
    save_pretrained would then write twice: only its first name is kept, as in one process's final/."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_full_options(cpu_offload=True))
    aliases = ({name for name, _ in model.named_parameters(remove_duplicate=False)}
               - {name for name, _ in model.named_parameters()})
    return {name: tensor for name, tensor in state.items() if name not in aliases}


def _param_fqns(model: torch.nn.Module, optimizer) -> list[list[str]]:
    """Each optimizer param group's parameters by name, in the group's order (the indices of its state_dict)."""
    names = {id(param): name for name, param in model.named_parameters()}
    return [[names[id(param)] for param in group["params"]] for group in optimizer.param_groups]


def gather_optimizer(model: torch.nn.Module, optimizer) -> dict[str, Any]:
    """The optimizer's full state dict on rank 0 in `optimizer.state_dict()`'s own layout (states keyed by the
    parameter's index over the param groups), so the checkpoint is the one a single process writes. A collective.

    An optimizer that has not stepped yet has no state; torch's gather would create one by stepping with zero
    gradients (its step counters would then start at 1), so its own state_dict is saved as it is."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if not optimizer.state:  # the same on every rank: they step together
        return optimizer.state_dict()
    by_name = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    if not by_name:
        return {}  # not rank 0
    index = {name: position for position, name in enumerate(sum(_param_fqns(model, optimizer), []))}
    groups = [{**group, "params": [index[name] for name in group["params"]]} for group in by_name["param_groups"]]
    return {"state": {index[name]: state for name, state in by_name["state"].items()}, "param_groups": groups}


def load(model: torch.nn.Module, optimizer, tensors: dict[str, torch.Tensor], optimizer_state: dict[str, Any]) -> None:
    """Every rank: the checkpoint's full trainable tensors and optimizer state (the one-process layout) into this
    rank's shards."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, tensors, options=_full_options(strict=False))
    if not optimizer_state.get("state"):
        optimizer.load_state_dict(optimizer_state)  # saved before the first step: nothing to shard
        return
    fqns = sum(_param_fqns(model, optimizer), [])
    groups = [{**group, "params": [fqns[position] for position in group["params"]]}
              for group in optimizer_state["param_groups"]]
    by_name = {"state": {fqns[position]: state for position, state in optimizer_state["state"].items()},
               "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, by_name, options=_full_options())


class FsdpEngine(OneProcessEngine):
    """`--distributed fsdp` on several processes. The model is not given to accelerate (no DDP around it): `shard`
    wraps it before the optimizer is built, each micro-batch's backward reduce-scatters its gradients (summed, not
    averaged), only the step's loss is all-reduced, and checkpoints gather the full trainable and optimizer states
    to rank 0 in the one-process format. Forward and backward hold collectives (see memfit.distributed.interface)."""

    name = "fsdp"
    distributed = True
    collectives_in_step = True

    def check(self) -> None:
        from memfit.distributed.engines import check_engine

        check_engine(self.config, self.device_name, self.ranks.world_size)

    def accelerator_kwargs(self) -> dict[str, Any]:
        # No plugin: accelerate's does nothing on CPU, and memfit shards the model itself.
        return self._process_group({})

    def shard(self, model: torch.nn.Module) -> str:
        units = shard(model, self.config, self.precision)
        self.sharded = model  # before torch.compile: the state dicts are read from the sharded module
        return (f"fsdp: {units} units fully sharded over {self.ranks.world_size} ranks "
                f"({torch.distributed.get_backend()})")

    def prepare(self, model, optimizer) -> None:
        # Not through accelerate.prepare: it would wrap the sharded model in DDP on CPU processes.
        self.model, self.optimizer = model, optimizer
        self._trainable = [param for param in model.parameters() if param.requires_grad]

    def forward_backward(self, loss_of: Callable[[Any], torch.Tensor], last: bool) -> torch.Tensor:
        loss = loss_of(self.model)
        loss.backward()  # FSDP reduce-scatters this micro-batch's gradients into the shards
        return loss

    def end_step(self, loss_sum, failure: str | None, agree: Callable[[str | None], None]) -> None:
        agree(failure)
        all_reduce_sum([loss_sum])  # the gradients were reduce-scattered in each backward

    def clip(self, max_norm: float) -> torch.Tensor:
        return clip_grad_norm(self._trainable, max_norm)

    def sum_over_ranks(self, values: list[torch.Tensor]) -> None:
        all_reduce_sum(values)

    def checkpoint_files(self, engine_dir: Path) -> dict[str, Any]:
        return {"tensors": gather_trainable(self.sharded), "optimizer_state": gather_optimizer(self.sharded,
                                                                                               self.optimizer)}

    def restore(self, engine_dir: Path) -> Callable[[dict, dict], None]:
        def load_states(tensors, optimizer_state):
            load(self.sharded, self.optimizer, tensors, optimizer_state)

        return load_states

    def final_state(self) -> dict[str, torch.Tensor]:
        return gather_trainable(self.sharded) if self.config.uses_adapters else gather_model(self.sharded)

    def eval_share(self, rows: list[Any], micro_batch: int) -> tuple[list[Any], int | None]:
        # Forward passes hold collectives: every rank runs as many (the longest share's).
        world = self.ranks.world_size
        return rows[self.ranks.rank::world], math.ceil(math.ceil(len(rows) / world) / micro_batch)
