"""The statements of a module class's forward: memfit replaces a forward only where its source is exactly the one
its fused version computes (memfit.train.gated_mlp, memfit.train.rms_norm)."""

from __future__ import annotations

import functools
import inspect


@functools.cache  # one look per class, not per layer
def forward_statements(forward) -> tuple[str, ...]:
    """`forward`'s body, one stripped line each, blank and comment lines left out; () where there is no source."""
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return ()
    return tuple(line.strip() for line in source.splitlines()[1:] if line.strip() and not line.strip().startswith("#"))
