"""Fault injection for tests: make the rare failures happen on demand, through the real code paths.

Set `MEMFIT_FAULTS` to a comma-separated list (read once per process):
- `oom@K`        the first attempt of optimizer step K raises an out-of-memory error in its forward pass;
- `oom@K+`       every attempt of step K does (so even micro-batch 1 fails: the unrecoverable case);
- `save_pause@K[:S]`  the checkpoint of step K pauses S seconds (default 60) after its first file is written,
                 with a `.paused` marker in the half-written directory (to kill the process mid-write);
- `leak@MB`      every optimizer step retains MB megabytes that are never freed (a leaking framework);
- `oomkill@MB`   a process whose RSS passes MB megabytes (checked at every memory reading of the guard) sends
                 itself SIGKILL: the kernel's OOM killer on a machine with that much memory;
- `sigkill@K`    the process training step K sends itself SIGKILL in the step's forward pass, once per run
                 directory (a marker file remembers it, so the restarted process goes on): the OOM killer, at a
                 step of our choosing;
- `crash@K`      step K raises a RuntimeError (a bug, a CUDA fault), once per run directory;
- `enospc@K`     the checkpoint of step K fails with "No space left on device" after its first file is written;
- `sigterm@K`    the process training step K sends itself SIGTERM before the step's first micro-batch, once per run
                 directory (a stop request, as from `kill` or a launcher).
Any of them takes a rank selector as its last part, `:rankN` (`leak@50:rank1`, `oom@2:rank1`, `save_pause@3:5:rank0`):
then only the process of that rank (RANK, set by torchrun; memfit.distributed.ranks) has the fault, the others run
clean. Without one every process has it.
Nothing here runs unless the variable is set.
"""

from __future__ import annotations

import errno
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
    from memfit.distributed.ranks import current

    rank = current().rank
    faults = {}
    for item in os.environ.get(ENV, "").split(","):
        name, _, arg = item.strip().partition("@")
        head, _, selector = arg.rpartition(":")
        if selector.startswith("rank") and selector[4:].isdigit():
            if int(selector[4:]) != rank:
                continue  # another rank's fault
            arg = head
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


def _once(name: str, step: int, run_dir: Path) -> bool:
    """True the first time any process of this run reaches fault `name` at `step` (then a marker remembers it)."""
    spec = _faults().get(name)
    if spec is None or int(spec) != step:
        return False
    from memfit.distributed.ranks import current

    ranks = current()
    # Each rank remembers its own faults (a fault on every rank fires on every rank).
    marker = run_dir / (f".fault-{name}-{step}" + (f"-rank{ranks.rank}" if ranks.distributed else ""))
    if marker.exists():
        return False
    marker.touch()
    return True


def maybe_die(step: int, run_dir: Path) -> None:
    if _once("sigkill", step, run_dir):
        os.kill(os.getpid(), signal.SIGKILL)
    if _once("sigterm", step, run_dir):
        os.kill(os.getpid(), signal.SIGTERM)
    if _once("crash", step, run_dir):
        raise RuntimeError(f"injected crash at step {step} ({ENV})")


def maybe_disk_full(step: int) -> None:
    spec = _faults().get("enospc")
    if spec is not None and int(spec) == step:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
