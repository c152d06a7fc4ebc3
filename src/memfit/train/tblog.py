"""`memfit train --tensorboard`: an event sink that logs the run to RUN_DIR/tensorboard (torch.utils.tensorboard).

The loop does not know about it: like RunDir, it receives the loop's events. tensorboard is an optional package;
`require_tensorboard` says so in one line before anything is loaded.
"""

from __future__ import annotations

from pathlib import Path

from memfit.errors import UserError
from memfit.events import (CheckpointSaved, EvalEnd, Event, GuardNotice, OomRecovered, RunEnded, RunStarted,
                           StepEnd)

TENSORBOARD_DIR = "tensorboard"
from memfit.units import GB
# metrics.jsonl's memory fields and the scalar names they get (in GB).
MEMORY_SCALARS = {"watched_bytes": "memory/watched_gb", "rss_bytes": "memory/rss_gb",
                  "peak_rss_bytes": "memory/peak_rss_gb", "system_available_bytes": "memory/system_available_gb",
                  "cuda_allocated_bytes": "memory/gpu_allocated_gb", "cuda_reserved_bytes": "memory/gpu_reserved_gb"}


def require_tensorboard() -> None:
    """A UserError (exit 2) naming the install command when the tensorboard package is missing."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package, which is not installed",
                        hint="pip install tensorboard (or memfit[tensorboard]), or drop --tensorboard") from None


class TensorBoardSink:
    """Scalars per step (loss, lr, tokens/s, memory), the validation loss, and guard/OOM/checkpoint notes as text."""

    def __init__(self, run_dir: Path):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(run_dir) / TENSORBOARD_DIR
        # purge_step on resume is left to TensorBoard: a resumed run appends a new event file, and TensorBoard
        # shows the later values of a step.
        self.writer = SummaryWriter(log_dir=str(self.path), flush_secs=10)
        self.limit_bytes: int | None = None

    def __call__(self, event: Event) -> None:
        writer = self.writer
        if isinstance(event, RunStarted):
            self.limit_bytes = event.limit_bytes
        elif isinstance(event, StepEnd):
            step = event.step
            writer.add_scalar("train/loss", event.loss, step)
            writer.add_scalar("train/avg_loss", event.avg_loss, step)
            writer.add_scalar("train/lr", event.lr, step)
            writer.add_scalar("train/tokens_per_s", event.tokens_per_s, step)
            writer.add_scalar("train/micro_batch", event.micro_batch, step)
            if event.grad_norm is not None:
                writer.add_scalar("train/grad_norm", event.grad_norm, step)
            values = {"watched_bytes": event.watched_bytes, **event.memory}
            for key, name in MEMORY_SCALARS.items():
                if isinstance(values.get(key), (int, float)):
                    writer.add_scalar(name, values[key] / GB, step)
            if self.limit_bytes:
                writer.add_scalar("memory/limit_gb", self.limit_bytes / GB, step)
        elif isinstance(event, EvalEnd):
            writer.add_scalar("val/loss", event.val_loss, event.step)
            writer.add_scalar("val/perplexity", event.val_perplexity, event.step)
        elif isinstance(event, (GuardNotice, OomRecovered)):
            writer.add_text("guard", event.message, event.step)
        elif isinstance(event, CheckpointSaved):
            writer.add_text("checkpoints", f"{event.path} ({event.reason})", event.step)
        elif isinstance(event, RunEnded):
            writer.add_text("end", f"{event.status} (exit {event.exit_code}): {event.message}", event.step)
            writer.close()  # the last event of the run: everything is on disk when train() returns

    def close(self) -> None:
        self.writer.close()
