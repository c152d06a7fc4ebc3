"""Fault injection for tests: make the rare failures happen on demand, through the real code paths.

Set `MEMFIT_FAULTS` to a comma-separated list (read once per process):
- `oom@K[+][:forward|:backward|:update][:mbN][:layerL]`  the first attempt of optimizer step K (with `+`: every attempt,
                 so even micro-batch 1 fails: the unrecoverable case) runs out of memory for real inside its N-th
                 micro-batch (default 1): in the forward pass of decoder layer L (default: the middle one), or, with
                 `:backward`, when the backward pass reaches that layer's output (which must be part of the
                 graph: the default LoRA on every layer makes it so). A hook on the layer asks torch's
                 allocator for an impossible block (2^50 bytes, on the activation's device), so the error is the
                 allocator's own (`DefaultCPUAllocator: can't allocate memory`; CUDA's torch.OutOfMemoryError),
                 raised with the autograd graph half built. A model without decoder layers memfit can find gets the
                 same allocation at the start of the micro-batch; the MLX engine (one compiled graph per micro-batch:
                 no layer hooks) gets it before the micro-batch's graph is built, with `:backward` once it is
                 built and before it is evaluated, or with `:update` once the optimizer update's graph is built
                 (with clipping the update is a graph of its own, after the last micro-batch's gradients);
- `leak_forward@MB[:fromK]`  from step K on (default 1), every decoder layer's forward call retains MB megabytes
                 that are never freed: memory that rises inside the forward pass, faster than any step ends;
- `save_pause@K[:S]`  the checkpoint of step K pauses S seconds (default 60) after its first file is written,
                 with a `.paused` marker in the half-written directory (to kill the process mid-write);
- `rename_pause@K[:S]`  the checkpoint of step K, when it replaces a checkpoint of the same step, pauses S seconds
                 (default 60) between its two renames (the old copy moved aside, the new one not yet in place), with
                 a `.fault-rename_pause-K` marker in the run directory (to kill the process there);
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
- `fake_gpu@MB`  the guard of `memfit train` watches a fake GPU: its readings say the CUDA caching allocator holds
                 MB megabytes (allocated and reserved alike, its high-water mark too) beside this process's real RSS
                 and the machine's real available memory, so a run on the CPU is guarded as on CUDA (the device limit
                 on the fake figure, host RAM on the real ones: --max-host-memory and the available floor).
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

from dataclasses import dataclass
from typing import Any, Callable

import torch

ENV = "MEMFIT_FAULTS"
_leaked: list[torch.Tensor] = []
# Where the layer faults fired (step, attempt, micro_batch, layer, phase, in_backward): for tests to check that an
# injected OOM really came from inside the forward or the backward pass.
fired: list[dict[str, Any]] = []
# More than any machine's address space (x86-64 and arm64 user space is 2^47-2^48 bytes): no allocator can serve it.
IMPOSSIBLE_BYTES = 1 << 50


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


@dataclass(frozen=True)
class OomFault:
    """`oom@K[+][:forward|:backward|:update][:mbN][:layerL]`, parsed (`update`: the MLX engine's optimizer update)."""

    step: int
    every_attempt: bool = False
    phase: str = "forward"  # forward | backward | update
    micro_batch: int = 1  # 1-based, within the step's attempt
    layer: int | None = None  # decoder layer index; None: the middle one

    @classmethod
    def parse(cls, spec: str) -> "OomFault":
        head, *parts = spec.split(":")
        fault = {"step": int(head.rstrip("+")), "every_attempt": head.endswith("+")}
        for part in parts:
            if part in ("forward", "backward", "update"):
                fault["phase"] = part
            elif part.startswith("mb") and part[2:].isdigit() and int(part[2:]) >= 1:
                fault["micro_batch"] = int(part[2:])
            elif part.startswith("layer") and part[5:].isdigit():
                fault["layer"] = int(part[5:])
            else:
                raise ValueError(f"{ENV}: oom@{spec}: unknown part {part!r} (forward, backward, update, mbN, layerL)")
        return cls(**fault)

    def fires(self, step: int, attempt: int, micro_batch: int) -> bool:
        return step == self.step and (self.every_attempt or attempt == 0) and micro_batch == self.micro_batch


def oom_fault() -> OomFault | None:
    spec = _faults().get("oom")
    return None if spec is None else OomFault.parse(spec)


def impossible_allocation(like: torch.Tensor | None = None) -> None:
    """Ask torch's allocator (on `like`'s device) for a block no machine has: it raises its own out-of-memory
    error, exactly as when memory really runs out (the same exception type, message and unwinding)."""
    device = like.device if like is not None else torch.device("cpu")
    torch.empty(IMPOSSIBLE_BYTES, dtype=torch.uint8, device=device)


def maybe_oom(step: int, attempt: int, micro_batch: int = 1, phase: str | None = None) -> None:
    """The fallback for a model without decoder layers memfit can find: the OOM at the start of the micro-batch
    (any phase). The MLX engine, whose micro-batch is one compiled graph, names the phase: `forward` before the
    micro-batch's graph is built, `backward` once it is, `update` once the optimizer update's graph is (without
    clipping, the last micro-batch's graph holds the update: `backward` and `update` fire at the same point)."""
    fault = oom_fault()
    if fault is not None and fault.fires(step, attempt, micro_batch) and phase in (None, fault.phase):
        fired.append({"step": step, "attempt": attempt, "micro_batch": micro_batch, "layer": None,
                      "phase": phase or "start", "in_backward": phase == "backward"})
        impossible_allocation()


def layer_faults_active() -> bool:
    return "oom" in _faults() or "leak_forward" in _faults()


def install_layer_faults(layers: list[torch.nn.Module],
                         position: Callable[[], tuple[int, int, int] | None]) -> list[Any]:
    """Forward hooks on the decoder layers for `oom@` and `leak_forward@`. `position()` says which micro-batch is
    running (step, attempt, micro-batch, 1-based), or None outside a training micro-batch (evaluation). Returns the
    hook handles."""
    oom = oom_fault()
    leak = _faults().get("leak_forward")
    leak_mb, _, leak_from = (leak or "0").partition(":")
    leak_bytes, leak_from_step = int(float(leak_mb) * 1024**2), int(leak_from or 1)
    oom_layer = (oom.layer if oom is not None and oom.layer is not None else len(layers) // 2)

    def hook_for(index: int):
        def after_layer(module, args, output) -> None:
            where = position()
            if where is None:
                return
            step, attempt, micro_batch = where
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            if leak is not None and step >= leak_from_step:
                # ones, not empty: untouched pages would not count in RSS. On the layer's device: a GPU's guard
                # watches that device's memory (benchmarks/gpu_check.py stops a run with it on CUDA).
                device = hidden.device if isinstance(hidden, torch.Tensor) else "cpu"
                _leaked.append(torch.ones(leak_bytes // 4, dtype=torch.float32, device=device))
            if oom is None or index != oom_layer or not oom.fires(step, attempt, micro_batch):
                return
            record = {"step": step, "attempt": attempt, "micro_batch": micro_batch, "layer": index,
                      "phase": oom.phase}
            if oom.phase == "forward":
                fired.append({**record, "in_backward": False})
                impossible_allocation(hidden if isinstance(hidden, torch.Tensor) else None)
            if not (isinstance(hidden, torch.Tensor) and hidden.requires_grad):
                return  # a pass without a graph (gradient checkpointing's first one): its recompute will come

            def in_backward(grad: torch.Tensor) -> None:
                fired.append({**record, "in_backward": torch._C._current_autograd_node() is not None})
                impossible_allocation(grad)

            hidden.register_hook(in_backward)

        return after_layer

    return [layer.register_forward_hook(hook_for(index)) for index, layer in enumerate(layers)]


def maybe_pause_save(step: int, partial_dir: Path) -> None:
    spec = _faults().get("save_pause")
    if spec is None:
        return
    at, _, seconds = spec.partition(":")
    if int(at) == step:
        (partial_dir / ".paused").touch()
        time.sleep(float(seconds or 60))


def maybe_pause_rename(step: int, run_dir: Path) -> None:
    spec = _faults().get("rename_pause")
    if spec is None:
        return
    at, _, seconds = spec.partition(":")
    if int(at) == step:
        (run_dir / f".fault-rename_pause-{step}").touch()
        time.sleep(float(seconds or 60))


def maybe_leak() -> None:
    spec = _faults().get("leak")
    if spec is not None:
        # ones_, not empty: untouched pages would not count in RSS.
        _leaked.append(torch.ones(int(float(spec) * 1024**2) // 4, dtype=torch.float32))


def fake_gpu_bytes() -> int | None:
    """`fake_gpu@MB`: the bytes a CPU run's guard is to read as the GPU's allocator holding (the run is guarded as on
    a GPU: memfit.train.setup.start_guard), else None."""
    spec = _faults().get("fake_gpu")
    return None if spec is None else int(float(spec) * 1024**2)


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
