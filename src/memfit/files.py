"""The one way memfit writes a file whole or not at all: beside it, flushed to disk, then renamed over it."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, text: str, *, fsync: bool = True) -> None:
    """Write `text` to `path` so that a reader (or a crash) sees the old file or the new one, never a part.
    `fsync=False` where losing the newest version to a power cut costs nothing (a cache)."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(partial, "w", encoding="utf-8") as file:
        file.write(text)
        if fsync:
            file.flush()
            os.fsync(file.fileno())
    os.replace(partial, path)
