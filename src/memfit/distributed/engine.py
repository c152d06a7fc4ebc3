"""Which engine a run uses: `pick_engine`, the one place the loop (memfit.train.loop) asks how a step runs. The
interface every engine implements, and what each module holds, is memfit.distributed.interface (its `Engine` is
named here too). The engines' modules are imported only when picked: each imports torch and its own libraries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from memfit.distributed.interface import Engine

if TYPE_CHECKING:
    from memfit.config import TrainConfig
    from memfit.distributed.ranks import Ranks

__all__ = ["Engine", "pick_engine"]


def pick_engine(config: TrainConfig, ranks: Ranks, device: str) -> Engine:
    """The engine of this run: `--distributed zeroN` is DeepSpeed (in one process too: ZeRO-Offload); on several
    processes `fsdp` is FSDP and anything else DDP; one process is one process (`fsdp` of one is not sharded)."""
    if config.distributed in ("zero1", "zero2", "zero3"):
        from memfit.distributed.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(config, ranks, device)
    if ranks.distributed and config.distributed == "fsdp":
        from memfit.distributed.fsdp import FsdpEngine

        return FsdpEngine(config, ranks, device)
    if ranks.distributed:
        from memfit.distributed.ddp import DdpEngine

        return DdpEngine(config, ranks, device)
    from memfit.distributed.single import OneProcessEngine

    return OneProcessEngine(config, ranks, device)
