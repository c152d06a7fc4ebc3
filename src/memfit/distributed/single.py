"""One process: accelerate for mixed precision and the device, no collective anywhere.

The base of the other torch engines (ddp, fsdp, deepspeed), which change what differs from it.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import torch

from memfit.distributed.interface import Engine
from memfit.errors import UserError


class OneProcessEngine(Engine):
    name = "single"  # one process

    def accelerator_kwargs(self) -> dict[str, Any]:
        """Extra `accelerate.Accelerator(...)` arguments: one process needs none."""
        return {}

    def _process_group(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """gloo for CPU processes (accelerate would pick MPI where torch has it)."""
        from accelerate.utils import InitProcessGroupKwargs

        if self.device_name == "cpu":
            kwargs["kwargs_handlers"] = [*kwargs.get("kwargs_handlers", []), InitProcessGroupKwargs(backend="gloo")]
        return kwargs

    def start(self, precision) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from memfit.distributed.collective import Agreement

        self.precision = precision
        set_seed(self.config.seed)
        self.accelerator = Accelerator(mixed_precision=precision.accelerate_mixed_precision,
                                       cpu=self.device_name == "cpu", **self.accelerator_kwargs())
        if self.accelerator.num_processes != self.ranks.world_size:
            raise UserError(f"accelerate sees {self.accelerator.num_processes} processes, the launcher "
                            f"{self.ranks.world_size}", hint="launch with torchrun or accelerate launch")
        self.agreement = Agreement(self.ranks)

    @property
    def device(self):
        return self.accelerator.device

    def prepare(self, model, optimizer) -> None:
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self._trainable = [param for param in self.model.parameters() if param.requires_grad]

    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def trainable(self) -> list[torch.nn.Parameter]:
        return self._trainable

    def forward_backward(self, loss_of: Callable[[Any], torch.Tensor], last: bool) -> torch.Tensor:
        # no_sync before the last micro-batch (accelerate's own accumulation idiom; nothing to skip without DDP).
        with nullcontext() if last else self.accelerator.no_sync(self.model):
            loss = loss_of(self.model)
            self.accelerator.backward(loss)
        return loss

    def clip(self, max_norm: float) -> torch.Tensor | None:
        # DeepSpeed clipped in its step: accelerate returns the engine's norm (a float, or None).
        norm = self.accelerator.clip_grad_norm_(self._trainable, max_norm)
        if norm is not None and not isinstance(norm, torch.Tensor):
            norm = torch.tensor(float(norm), device=self.device)
        return norm

    def optimizer_step(self) -> None:
        self.optimizer.step()  # DeepSpeed: a no-op (the engine stepped)
        self.optimizer.zero_grad(set_to_none=True)

    def drop_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
