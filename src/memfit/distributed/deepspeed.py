"""DeepSpeed ZeRO 1/2/3 (`--distributed zero1|zero2|zero3`, CUDA; one process too: ZeRO-Offload on one GPU).

DeepSpeed's engine comes from `accelerator.prepare`. memfit weights its micro-batches itself, so the backward is
`accelerator.backward(loss, scale_wrt_gas=False)`, with the accumulation boundary set on the last micro-batch, where
the engine clips and steps. Its checkpoint is `accelerator.save_state` (each rank its partition) inside memfit's.
Forward and backward hold collectives (ZeRO-3 gathers parameters, ZeRO-2 reduces gradients), so an out-of-memory
error there is not recovered in the process (memfit.distributed.interface).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

import torch

from memfit.distributed.collective import all_reduce_sum
from memfit.distributed.single import OneProcessEngine


def single_process_rendezvous() -> None:
    """DeepSpeed in one process without a launcher (ZeRO-Offload on one GPU): the variables torchrun would set, so
    accelerate initialises DeepSpeed's process group of one (without them deepspeed looks for MPI)."""
    import socket

    if os.environ.get("LOCAL_RANK") not in (None, ""):
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                        "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(name, value)


class DeepSpeedEngine(OneProcessEngine):
    name = "deepspeed"
    collectives_in_step = True
    per_rank_checkpoint = True

    def __init__(self, config, ranks, device):
        super().__init__(config, ranks, device)
        self.distributed = ranks.distributed

    def check(self) -> None:
        if self.distributed:  # one process: accelerator_kwargs checks it (the plugin cannot be built otherwise)
            from memfit.distributed.engines import check_engine

            check_engine(self.config, self.device_name, self.ranks.world_size)

    def accelerator_kwargs(self) -> dict[str, Any]:
        from memfit.distributed.engines import accelerator_kwargs

        kwargs = dict(accelerator_kwargs(self.config, self.device_name))
        if not self.distributed:
            single_process_rendezvous()
        return self._process_group(kwargs)

    def chunked_loss_blocker(self) -> str | None:
        if self.config.distributed == "zero3":
            # The chunked loss reads the head's weight after the model's forward; ZeRO-3 has released it.
            return "ZeRO-3 partitions the lm_head weight outside the model's forward"
        return None

    def forward_backward(self, loss_of: Callable[[Any], torch.Tensor], last: bool) -> torch.Tensor:
        loss = loss_of(self.model)
        # accelerate's DeepSpeed backward marks the accumulation boundary from sync_gradients and steps the engine
        # there (clipping, optimizer, zero_grad): only on the last micro-batch. scale_wrt_gas=False: the engine would
        # divide by gradient_accumulation_steps, and memfit's token weights already sum to 1 over the step.
        state = self.accelerator.gradient_state
        state._set_sync_gradients(last)
        try:
            self.accelerator.backward(loss, scale_wrt_gas=False)
        finally:
            state._set_sync_gradients(True)
        return loss

    def end_step(self, loss_sum, failure: str | None, agree: Callable[[str | None], None]) -> None:
        # The engine stepped in the last micro-batch's backward: a stop agreed now could not undo it, so the step
        # ends here (the loop's step-end agreement comes next). Only the loss is summed.
        if self.distributed:
            all_reduce_sum([loss_sum])

    def sum_over_ranks(self, values: list[torch.Tensor]) -> None:
        if self.distributed:
            all_reduce_sum(values)

    def checkpoint_files(self, engine_dir: Path) -> dict[str, Any]:
        # Each rank writes its partition (DeepSpeed's engine checkpoint, through accelerate); rank 0 moves the
        # directory into the checkpoint once all have, so the checksums cover every rank's files. The output dir
        # must be on a filesystem every node sees (as DeepSpeed's own checkpoints need).
        self.accelerator.save_state(str(engine_dir))
        tensors = self._trainable_tensors()
        self.agreement.barrier()
        return {"tensors": tensors, "optimizer_state": {}, "engine_dir": engine_dir}

    def restore(self, engine_dir: Path) -> Callable[[dict, dict], None]:
        # The engine's own state (each rank its partition: weights, fp32 masters, optimizer) is the exact one; the
        # gathered trainable tensors beside it are for reading, not for resuming.
        self.accelerator.load_state(str(engine_dir))

        def load_states(tensors, optimizer_state):
            pass

        return load_states

    def _trainable_tensors(self) -> dict[str, torch.Tensor]:
        """The trainable tensors (the engine's 16-bit ones) on rank 0's CPU; a collective under ZeRO-3. Under
        ZeRO-1/2 every rank holds them whole; ZeRO-3 gathers the adapters alone (GatheredParameters), and a full
        fine-tune through accelerate's consolidated 16-bit state dict, layer by layer to rank 0."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        named = [(name, param) for name, param in unwrapped.named_parameters() if param.requires_grad]
        main = self.ranks.is_main
        if self.config.distributed != "zero3":
            return {name: param.detach().cpu().contiguous() for name, param in named} if main else {}
        if not self.config.uses_adapters:
            wanted = {name for name, _ in named}
            full = self.accelerator.get_state_dict(self.model) or {}
            return {name: tensor.detach().cpu().contiguous() for name, tensor in full.items() if name in wanted}
        import deepspeed

        with deepspeed.zero.GatheredParameters([param for _, param in named], modifier_rank=None):
            return {name: param.detach().cpu().clone() for name, param in named} if main else {}

    def final_state(self) -> dict[str, torch.Tensor] | None:
        if self.config.uses_adapters:
            return self._trainable_tensors()
        # ZeRO-1/2 hold the whole 16-bit model on every rank: save_pretrained reads it as it is.
        return self.accelerator.get_state_dict(self.model) if self.config.distributed == "zero3" else None

    def eval_share(self, rows: list[Any], micro_batch: int) -> tuple[list[Any], int | None]:
        if not self.distributed:
            return rows, None
        # Forward passes hold collectives: every rank runs as many (the longest share's).
        world = self.ranks.world_size
        return rows[self.ranks.rank::world], math.ceil(math.ceil(len(rows) / world) / micro_batch)
