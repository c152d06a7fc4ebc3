"""The seam between the training loop and the way a step runs: one `Engine` per way, each in its own module.

- memfit.distributed.single: one process (accelerate for precision; no collective anywhere).
- memfit.distributed.ddp: several processes, each the whole model; gradients summed once at the step end.
- memfit.distributed.fsdp: several processes, memfit's own FSDP2 sharding; gradients reduce-scattered in backward.
- memfit.distributed.deepspeed: DeepSpeed ZeRO 1/2/3 through accelerate, one process (ZeRO-Offload) or several.

The loop (memfit.train.loop) asks "which engine?" once (memfit.distributed.engine.pick_engine) and then only calls the methods below; every
engine's quirks, and the comments that explain them, live in its module. What an engine is for the loop:

- `start(precision)` sets up the runtime before the model loads (process group, mixed precision, seeds);
  `shard(model)` may split the model before the optimizer is built; `prepare(model, optimizer)` takes both over.
- `forward_backward(loss_of, last)`: one micro-batch. `loss_of(model)` is the loop's loss of that micro-batch on
  the engine's model; the engine runs it and accumulates its gradient, and returns the loss. A functional engine
  (MLX's `value_and_grad`) fits the same call: it differentiates `loss_of` itself and keeps the gradients.
- `end_step(loss_sum, failure, agree)`: the step-end reduction: the ranks' agreement (`agree(failure)`, which raises
  when any rank failed or asks to stop) where the engine can still drop the step, and the sums over the ranks.
- `clip(max_norm)`, `optimizer_step()`, `drop_gradients()`: the rest of a step, and the way out of a failed one.
- `checkpoint_files(engine_dir)`, `restore(engine_dir)`: the engine's part of a checkpoint, out and in (files it
  writes itself go in `engine_dir`, which the checkpoint then holds);
  `final_state()`: what final/ is written from (None: the model's own state dict).
- `eval_share(rows, micro_batch)`, `sum_over_ranks(values)`: evaluation batches and their sums.

The signatures hold no torch type: models, losses and tensors pass through as `Any`, so an engine without torch
can implement the same interface (tests/test_engine_interface.py drives the loop's step with a fake one).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from memfit.config import TrainConfig
    from memfit.distributed.ranks import Ranks


class Engine:
    """How one optimizer step runs. Subclasses set the class attributes and implement the methods."""

    name = "engine"
    # Several processes: the safe points are agreements of the ranks, and a step's sums are over all of them.
    distributed = False
    # Forward and backward hold collectives: an out-of-memory error there is not recoverable in the process (the
    # other ranks may wait in a collective), and no rank may leave a forward pass alone.
    collectives_in_step = False
    # Checkpoints hold each rank's partition: resuming needs the same number of processes, even with --force.
    per_rank_checkpoint = False

    def __init__(self, config: TrainConfig, ranks: Ranks, device: str):
        self.config, self.ranks, self.device_name = config, ranks, device
        self.model: Any = None
        self.optimizer: Any = None
        # memfit.distributed.collective.Agreement over the engine's process group, made by start() (the loop makes
        # a one-process one for an engine that leaves it None).
        self.agreement: Any = None

    @property
    def stops_inside_forward(self) -> bool:
        """Whether the guard's stop may cut a micro-batch short at a decoder layer's entry (one rank alone)."""
        return not (self.distributed or self.collectives_in_step)

    @property
    def device(self) -> Any:
        """Where the micro-batches' tensors go."""
        return self.device_name

    def check(self) -> None:
        """Refuse, in one line, what this engine cannot run here (before anything loads)."""

    def start(self, precision: Any) -> None:
        raise NotImplementedError

    def shard(self, model: Any) -> str | None:
        """Split `model` over the ranks before the optimizer is built; a line to report, or None."""
        return None

    def chunked_loss_blocker(self) -> str | None:
        """Why this engine cannot take the loss through the head by chunks (None: it can)."""
        return None

    def prepare(self, model: Any, optimizer: Any) -> None:
        raise NotImplementedError

    def unwrapped(self) -> Any:
        """The model as memfit built it (the PEFT model), without the engine's wrapper."""
        return self.model

    def trainable(self) -> list[Any]:
        return [param for param in self.model.parameters() if param.requires_grad]

    def forward_backward(self, loss_of: Callable[[Any], Any], last: bool) -> Any:
        raise NotImplementedError

    def end_step(self, loss_sum: Any, failure: str | None, agree: Callable[[str | None], None]) -> None:
        """After the step's micro-batches (`failure`: this rank's out-of-memory error, which ended them early)."""

    def clip(self, max_norm: float) -> Any | None:
        raise NotImplementedError

    def optimizer_step(self) -> None:
        raise NotImplementedError

    def drop_gradients(self) -> None:
        raise NotImplementedError

    def sum_over_ranks(self, values: list[Any]) -> None:
        """Sum tensors over the ranks, in place (one process: nothing to do)."""

    def checkpoint_files(self, engine_dir: Path) -> dict[str, Any]:
        """The engine's part of a checkpoint, as `memfit.train.checkpoint.save_checkpoint` keyword arguments
        (meaningful on rank 0; every rank calls it at the same point, and may write its own files into
        `engine_dir`, passed on as "engine_dir"). {}: the model's and optimizer's own states."""
        return {}

    def restore(self, engine_dir: Path) -> Callable[[dict, dict], None] | None:
        """Before the checkpoint's states are loaded (`engine_dir`: the files `checkpoint_files` wrote): the
        engine's own loading of the trainable tensors and optimizer state, or None for the default one."""
        return None

    def final_state(self) -> dict[str, Any] | None:
        """The state dict final/ is written from, whole on rank 0 (a collective); None: the model's own."""
        return None

    def eval_share(self, rows: list[Any], micro_batch: int) -> tuple[list[Any], int | None]:
        """This rank's validation rows, and how many batches every rank must run (None: as many as it has)."""
        return rows, None
