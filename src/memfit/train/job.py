"""What a training run is asked to do, besides its config (memfit.config.TrainConfig): a plain record, importable
without torch (the CLI and the supervisor build one before the trainer's process imports anything heavy)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memfit.train.checkpoint import Checkpoint


@dataclass
class TrainJob:
    """What to train on, besides the config."""

    model: str
    data: Path
    output_dir: Path
    val_data: Path | None = None
    device: str | None = None
    resume: Checkpoint | None = None
    force: bool = False  # resume even when the config changed in a way that breaks exactness
    # A probe trial (memfit.probe): measure memory, not learn. It trains the run's own first batches, and puts a
    # row of the longest length into its last one if that has none (where activations dominate, a step's peak is
    # set by its longest row, padding included). Not batches of only the longest rows: one repeated shape lets the
    # allocator reuse every block, and that read low against the real run (tiny model, batch 16: 578 against
    # 590 MB), which then stopped at a limit the probe had said it fits. An out-of-memory
    # error ends the run instead of being recovered (the probe wants to know), and nothing is checkpointed.
    trial: bool = False
    # Set by `memfit train --supervise` for the child it runs (memfit.train.supervisor):
    max_micro_batch: int | None = None  # after the child was OOM-killed: its next life starts at most this small
    reload_after: int | None = None  # --reload-interval: checkpoint and end (exit 75) after this many steps
    attempt: int | None = None  # which life of the supervised run this is (0: the first); in every metrics line
    fresh_restart: bool = False  # the first life died before any checkpoint: start over in its output dir
