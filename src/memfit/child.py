"""The child processes memfit starts, one entry point for both:

    python -m memfit.child life SPEC.json           a life of `memfit train --supervise` (memfit.train.supervisor)
    python -m memfit.child trial SPEC.json RUN_DIR  a probe trial (memfit.probe.trial)

Both train as an unsupervised `memfit train` does, rendered as it renders: a life to the terminal it shares with
its parent, with the run report at its end (memfit.api.run_training); a trial to nowhere (it is to hold what the
run it stands for will hold), keeping nothing. Each exits with the run's code; an expected failure is one line on
stderr (and, for a trial, its kind in the trial dir: memfit.probe.trial.child_error).

Only the standard library is imported at the top: a life asks to die with its parent before torch and
transformers load (seconds in which a killed supervisor would leave it running).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Callable


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


def life(spec_path: str) -> int:
    """A life of a supervised run: SPEC holds the TrainJob fields and the TrainConfig values the parent resolved."""
    # First, before the imports (seconds): until this call a killed supervisor would leave the child running.
    spec = json.loads(Path(spec_path).read_text())
    if not _end_with_parent(spec.get("supervisor_pid")):
        sys.stderr.write("memfit: error: the supervisor ended before the trainer started; not training\n")
        return 130

    def run(on_event):
        from memfit.api import run_training
        from memfit.config import TrainConfig
        from memfit.train import TrainJob
        from memfit.train.checkpoint import open_checkpoint

        fields = dict(spec["job"])
        resume = fields.pop("resume")
        engine = fields.pop("engine", "torch")  # `memfit train --engine mlx --supervise`: memfit.mlx
        for name in ("data", "output_dir", "val_data"):
            if fields.get(name) is not None:
                fields[name] = Path(fields[name])
        job = TrainJob(**fields, resume=open_checkpoint(Path(resume)) if resume else None)
        if engine == "mlx":
            from memfit.mlx import train_mlx
            from memfit.report import report_at_end

            return train_mlx(job, TrainConfig(**spec["config"]), on_event=report_at_end(job.output_dir, on_event))
        return run_training(job, TrainConfig(**spec["config"]), on_event)

    return _train(run, shown=True)


def trial(spec_path: str, run_dir: str) -> int:
    """A probe trial: SPEC is a memfit.probe.trial.TrialSpec; the run's files go to RUN_DIR."""

    def run(on_event):
        from memfit.config import TrainConfig
        from memfit.probe.trial import TrialSpec
        from memfit.sizing import EstimatorSizing
        from memfit.train import TrainJob, train

        spec = TrialSpec(**json.loads(Path(spec_path).read_text()))
        job = TrainJob(model=spec.model, data=Path(spec.data), output_dir=Path(run_dir), device=spec.device,
                       trial=True)
        if spec.engine == "mlx":  # `memfit probe --engine mlx`
            from memfit.mlx import train_mlx

            return train_mlx(job, TrainConfig(**spec.config), on_event=on_event)
        # A trial writes the estimate to its run.json as a run does: it is to hold what the run will hold.
        return train(job, TrainConfig(**spec.config), on_event=on_event, sizing=EstimatorSizing())

    def on_error(error: Exception) -> None:
        from memfit.probe.trial import write_child_error

        write_child_error(Path(spec_path).parent, error)

    return _train(run, shown=False, on_error=on_error)


def _train(run: Callable, *, shown: bool, on_error: Callable[[Exception], None] | None = None) -> int:
    """Set up the process, then `run(on_event)` with the terminal renderer; the run's exit code."""
    from rich.console import Console

    from memfit.errors import MemfitError, error_line
    from memfit.render import TrainRenderer
    from memfit.runtime import start

    start()
    renderer = TrainRenderer(Console() if shown else Console(file=open(os.devnull, "w")))
    try:
        try:
            return run(renderer).exit_code
        finally:
            renderer.close()  # once, and before an error line: the progress bar ends first
    except MemfitError as error:
        sys.stderr.write(f"memfit: error: {error_line(error)}\n")
        if on_error is not None:
            on_error(error)
        return error.exit_code


def main(argv: list[str]) -> int:
    kind, *args = argv
    return {"life": life, "trial": trial}[kind](*args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
