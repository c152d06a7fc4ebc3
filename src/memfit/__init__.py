"""memfit: fine-tune LLMs that fit — estimate, probe, train with a memory guard, report.

As a library (memfit.api): `memfit.estimate(...)`, `memfit.probe(...)`, `memfit.train(...)`, each returning a
typed result. Importing memfit loads none of them (no torch): each is imported on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from memfit.api import EstimateResult, TrainRun
    from memfit.probe.runner import ProbeResult

# The three calls are the packages estimate/, probe/ and train/, made callable (memfit.calls).
_CALLS = ("estimate", "probe", "train")
_RESULTS = {"EstimateResult": "memfit.api", "TrainRun": "memfit.api", "ProbeResult": "memfit.probe.runner"}

__all__ = ["EstimateResult", "ProbeResult", "TrainRun", "__version__", "estimate", "probe", "train"]


def __getattr__(name: str) -> Any:
    if name in _CALLS:
        return importlib.import_module(f"memfit.{name}")
    if name in _RESULTS:
        return getattr(importlib.import_module(_RESULTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
