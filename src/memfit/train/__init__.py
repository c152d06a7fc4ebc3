"""Training: model loading, losses, optimizers, the guarded loop, checkpoints (`from memfit.train import train`).

Calling the package, `memfit.train(...)`, is memfit.api.train (see memfit/__init__.py): options in, the run report
written at the end; `memfit.train.train(job, config)` is the trainer alone.

The names below are imported on first use (PEP 562): `python -m memfit.child life`, the trainer of
`memfit train --supervise`, asks to die with its parent (PR_SET_PDEATHSIG) before torch and transformers load,
which takes seconds; an eager import here would run first and leave that window open.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from memfit.train.job import TrainJob
    from memfit.train.loop import TrainResult, train

__all__ = ["TrainJob", "TrainResult", "train"]


def __getattr__(name: str) -> Any:
    if name == "TrainJob":
        from memfit.train.job import TrainJob

        return TrainJob
    if name in __all__:
        from memfit.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
