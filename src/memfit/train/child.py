"""The child of `memfit train --supervise` (memfit.train.supervisor): `python -m memfit.train.child SPEC.json`.

SPEC holds the TrainJob fields and the TrainConfig values the parent resolved; the child trains exactly as an
unsupervised `memfit train` does, rendered to the terminal it shares with the parent, and exits with its code.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path


def _end_with_parent(parent_pid: int | None) -> bool:
    """Linux: SIGTERM when the parent dies, so a killed supervisor leaves no trainer behind (it checkpoints).
    False when the parent is already gone: it died before the request, and nothing will ever send the signal."""
    if not sys.platform.startswith("linux"):
        return True
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return True
    return parent_pid is None or os.getppid() == parent_pid


def main(spec_path: str) -> int:
    # First, before the imports (seconds): until this call a killed supervisor would leave the child running.
    spec = json.loads(Path(spec_path).read_text())
    if not _end_with_parent(spec.get("supervisor_pid")):
        sys.stderr.write("memfit: error: the supervisor ended before the trainer started; not training\n")
        return 130
    from rich.console import Console

    from memfit.config import TrainConfig
    from memfit.errors import MemfitError, error_line
    from memfit.render import TrainRenderer
    from memfit.train import TrainJob, train
    from memfit.train.checkpoint import open_checkpoint

    from memfit.runtime import start

    start()
    fields = dict(spec["job"])
    renderer = TrainRenderer(Console())
    try:
        resume = fields.pop("resume")
        for name in ("data", "output_dir", "val_data"):
            if fields.get(name) is not None:
                fields[name] = Path(fields[name])
        job = TrainJob(**fields, resume=open_checkpoint(Path(resume)) if resume else None)
        return train(job, TrainConfig(**spec["config"]), on_event=renderer).exit_code
    except MemfitError as error:
        renderer.close()
        sys.stderr.write(f"memfit: error: {error_line(error)}\n")
        return error.exit_code
    finally:
        renderer.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
