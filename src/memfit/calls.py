"""`memfit.estimate(...)`, `memfit.probe(...)`, `memfit.train(...)`: the library's three calls (memfit.api) bear
the names of the packages that hold the work (memfit/estimate/, probe/, train/), and Python binds a package's name
on its parent once it is imported, so the names cannot be plain functions. Each of the three packages is made
callable instead (`make_callable(__name__)` in its __init__.py): calling it calls memfit.api's function of the same
name, and everything else of the package (`from memfit.train import TrainJob`) stays as it was.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
from typing import Any, Callable


class CallablePackage(types.ModuleType):
    def _api_function(self) -> Callable[..., Any]:
        # Imported by name on the first call: memfit.api sits above the packages it calls, and importing it at the
        # package's import would load them all (and torch) for any `import memfit.estimate...`.
        return getattr(importlib.import_module("memfit.api"), self.__name__.rpartition(".")[2])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._api_function()(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:  # inspect.signature / a notebook's help show the call's
        return inspect.signature(self._api_function())


def make_callable(package: str) -> None:
    """Make the imported package `package` callable as memfit.api's function of its last name."""
    sys.modules[package].__class__ = CallablePackage
