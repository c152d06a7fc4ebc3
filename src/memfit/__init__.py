"""memfit: fine-tune LLMs that fit — estimate, probe, train with a memory guard, report.

As a library (memfit.api): `memfit.estimate(...)`, `memfit.probe(...)`, `memfit.train(...)`, each returning a
typed result. Importing memfit loads none of them (no torch): each is imported on first use (PEP 562).

The three calls bear the names of the packages that hold the work (estimate/, probe/, train/), and Python binds a
subpackage's name on its parent as the subpackage is first imported, so the names cannot be plain functions. Each
of the three packages is callable instead: as Python binds it here (`_Memfit.__setattr__`, whoever imports it
first), its class becomes `_Call`, whose call is memfit.api's function of that name. Everything else of the
package (`from memfit.train import TrainJob`, `memfit.train.loop`) stays as it was.
"""

from __future__ import annotations

import importlib
import sys
import types

from memfit.version import __version__

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: `import memfit` stays a few modules
if TYPE_CHECKING:
    from typing import Any

    from memfit.api import EstimateResult, TrainRun
    from memfit.probe.runner import ProbeResult

_CALLS = ("estimate", "probe", "train")
_RESULTS = {"EstimateResult": "memfit.api", "TrainRun": "memfit.api", "ProbeResult": "memfit.probe.runner"}

__all__ = ["EstimateResult", "ProbeResult", "TrainRun", "__version__", "estimate", "probe", "train"]


class _Call(types.ModuleType):
    """The package memfit.estimate, memfit.probe or memfit.train: calling it calls memfit.api's function."""

    def _function(self) -> Any:
        # memfit.api imports the packages it calls (and torch on the way): only on the first call.
        return getattr(importlib.import_module("memfit.api"), self.__name__.rpartition(".")[2])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._function()(*args, **kwargs)

    @property
    def __signature__(self) -> Any:  # what inspect.signature and a notebook's help show: the call's parameters
        import inspect

        return inspect.signature(self._function())


class _Memfit(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _CALLS and type(value) is types.ModuleType:
            value.__class__ = _Call
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Memfit


def __getattr__(name: str) -> Any:
    if name in _CALLS:
        return importlib.import_module(f"memfit.{name}")
    if name in _RESULTS:
        return getattr(importlib.import_module(_RESULTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
