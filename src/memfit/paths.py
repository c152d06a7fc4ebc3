"""Where memfit keeps its own files: `$MEMFIT_CACHE`, else `$XDG_CACHE_HOME/memfit`, else `~/.cache/memfit`."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    if os.environ.get("MEMFIT_CACHE"):
        return Path(os.environ["MEMFIT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "memfit"
