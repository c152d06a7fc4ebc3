"""Fault injection for tests: make the rare failures happen on demand, through the real code paths.

Set `MEMFIT_FAULTS` to a comma-separated list (read once per process):
- `oom@K`        the first attempt of optimizer step K raises an out-of-memory error in its forward pass;
- `oom@K+`       every attempt of step K does (so even micro-batch 1 fails: the unrecoverable case);
- `save_pause@K[:S]`  the checkpoint of step K pauses S seconds (default 60) after its first file is written,
                 with a `.paused` marker in the half-written directory (to kill the process mid-write);
- `leak@MB`      every optimizer step retains MB megabytes that are never freed (a leaking framework);
- `oomkill@MB`   a process whose RSS passes MB megabytes (checked at every memory reading of the guard) sends
                 itself SIGKILL: the kernel's OOM killer on a machine with that much memory.
Nothing here runs unless the variable is set.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from pathlib import Path

import torch

ENV = "MEMFIT_FAULTS"
_leaked: list[torch.Tensor] = []


@functools.lru_cache(maxsize=1)
def _faults() -> dict[str, str]:
    faults = {}
    for item in os.environ.get(ENV, "").split(","):
        name, _, arg = item.strip().partition("@")
        if name:
            faults[name] = arg
    return faults


def maybe_oom(step: int, attempt: int) -> None:
    spec = _faults().get("oom")
    if spec is None:
        return
    every = spec.endswith("+")
    if int(spec.rstrip("+")) == step and (every or attempt == 0):
        raise torch.OutOfMemoryError(f"injected out-of-memory at step {step} ({ENV})")


def maybe_pause_save(step: int, partial_dir: Path) -> None:
    spec = _faults().get("save_pause")
    if spec is None:
        return
    at, _, seconds = spec.partition(":")
    if int(at) == step:
        (partial_dir / ".paused").touch()
        time.sleep(float(seconds or 60))


def maybe_leak() -> None:
    spec = _faults().get("leak")
    if spec is not None:
        # ones_, not empty: untouched pages would not count in RSS.
        _leaked.append(torch.ones(int(float(spec) * 1024**2) // 4, dtype=torch.float32))


def maybe_oom_kill(rss_bytes: int) -> None:
    spec = _faults().get("oomkill")
    if spec is not None and rss_bytes > float(spec) * 1024**2:
        os.kill(os.getpid(), signal.SIGKILL)
