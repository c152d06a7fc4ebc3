"""Which process this is among the ones a launcher started (torchrun, accelerate launch), read from the environment.

torchrun and accelerate launch both set RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE for every worker; a plain
`memfit train` has none of them and is rank 0 of 1. Reading the environment (not torch.distributed) means the answer
is there before the process group exists: the CLI and the loop's set-up use it to keep quiet and to skip writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Ranks:
    rank: int = 0  # this process's place among all of them
    world_size: int = 1  # how many processes train together
    local_rank: int = 0  # its place on this machine (its GPU index on CUDA)
    local_world_size: int = 1  # how many of them share this machine (and its RAM)

    @property
    def is_main(self) -> bool:
        """Rank 0 prints, writes the run directory and the checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        return default


def current() -> Ranks:
    world = max(1, _int_env("WORLD_SIZE", 1))
    rank = _int_env("RANK", 0)
    local_world = _int_env("LOCAL_WORLD_SIZE", world)
    return Ranks(rank=rank if 0 <= rank < world else 0, world_size=world, local_rank=_int_env("LOCAL_RANK", 0),
                 local_world_size=max(1, min(local_world, world)))


def is_main() -> bool:
    return current().is_main


def shard_rows(step_rows: list[int], length_of, rank: int, world_size: int) -> list[int]:
    """This rank's rows of one optimizer step: every rank sorts the step's rows (the same global order on every rank)
    longest first and takes every world_size-th, starting at its rank. Each rank gets the same number of rows (the
    step holds world_size x the per-rank batch) and rows of similar lengths, so no rank waits long for the slowest
    at the gradient all-reduce. Ties keep the stream's order (a stable sort), so the split is the same on every rank."""
    ordered = sorted(step_rows, key=lambda row: -length_of(row))
    return ordered[rank::world_size]
