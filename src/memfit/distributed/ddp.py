"""DDP: several processes (torchrun / accelerate launch), each holding the whole model, its gradients and optimizer.

accelerate wraps the model in DistributedDataParallel, but every micro-batch runs under `no_sync`: DDP's
in-backward all-reduce would leave a rank that ran out of memory (or wants to stop) out of a collective the others
are in. The gradients are summed once, at the step end, after the ranks' agreement (memfit.distributed.collective
says why), with the step's loss riding along in the same buckets.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from memfit.distributed.collective import all_reduce_sum, gradients
from memfit.distributed.single import OneProcessEngine


class DdpEngine(OneProcessEngine):
    name = "ddp"
    distributed = True

    def check(self) -> None:
        from memfit.distributed.engines import check_engine

        check_engine(self.config, self.device_name, self.ranks.world_size)

    def accelerator_kwargs(self) -> dict[str, Any]:
        from memfit.distributed.engines import accelerator_kwargs

        return self._process_group(dict(accelerator_kwargs(self.config, self.device_name)))

    def forward_backward(self, loss_of: Callable[[Any], torch.Tensor], last: bool) -> torch.Tensor:
        # no_sync on every micro-batch, the last one too: the sum comes after the step-end agreement.
        with self.accelerator.no_sync(self.model):
            loss = loss_of(self.model)
            self.accelerator.backward(loss)
        return loss

    def end_step(self, loss_sum, failure: str | None, agree: Callable[[str | None], None]) -> None:
        agree(failure)
        all_reduce_sum([*gradients(self._trainable), loss_sum])

    def sum_over_ranks(self, values: list[torch.Tensor]) -> None:
        all_reduce_sum(values)

    def eval_share(self, rows: list[Any], micro_batch: int) -> tuple[list[Any], int | None]:
        return rows[self.ranks.rank::self.ranks.world_size], None  # each rank its share; the sums are added up
