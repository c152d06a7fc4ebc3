"""Process set-up, the same in every entry point (the CLI, the child of a supervised life or of a probe trial, the
library calls `memfit.estimate/probe/train`): `start()` first, then the device a run uses.

What memfit asks of the libraries it imports (quiet, offline, PEFT without bitsandbytes) is memfit.libraries;
the allocator policy of a training process is memfit.allocator (the trainer applies it when it starts).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from memfit.errors import UserError
from memfit.libraries import quiet

DEVICES = ("cpu", "cuda", "mps")
_started = False


def start() -> None:
    """What every memfit process does before it imports a library: library chatter off, nothing online. Once per
    process (the library calls make it too: a notebook that calls memfit.train gets what the CLI gets)."""
    global _started
    if not _started:
        quiet()
        _started = True


def check_device(device: str | None) -> None:
    """A --device memfit knows (None: the default, `default_device()`)."""
    if device is not None and device not in DEVICES:
        raise UserError(f"unknown --device {device!r}: choose cpu, cuda or mps")


def default_device() -> str:
    """The device a run uses when none is named: CUDA, else Apple's MPS, else the CPU (imports torch; a process
    that must not can ask `memfit.system.detect().default_device()`, which reads the same from the hardware)."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@contextmanager
def signals_handled(handler: Callable, signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """`handler` for `signums` while the block runs; the handlers there were before are put back as it ends, also
    when it raises. Python lets only the main thread set a handler: in another thread (a notebook's worker) the block
    runs with the handlers as they are."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)


def stop_then_abort(run, ignore_repeat: Callable[[float], bool] | None = None) -> Callable:
    """The SIGINT/SIGTERM handler of a long command: the first signal sets `run.interrupted` to its name (the run
    stops at its next safe point, with a checkpoint or its journal written); a second one raises KeyboardInterrupt
    (abort now), unless `ignore_repeat(seconds since the first)` says it is a repeat of the first, not the user's.
    The first is not raised: a handler's exception surfaces wherever the main thread is, also inside a Python
    callback that torch runs from C++ (fake tensors being freed), where it cannot propagate and ends in
    std::terminate: SIGABRT, a core dump, the probe journal's last trial unwritten (seen once in CI)."""
    first_at = [0.0]

    def on_signal(signum, frame):
        if run.interrupted:
            if ignore_repeat is not None and ignore_repeat(time.monotonic() - first_at[0]):
                return
            raise KeyboardInterrupt
        run.interrupted = signal.Signals(signum).name
        first_at[0] = time.monotonic()

    return on_signal


def run_python_json(argv: list[str], timeout_s: float, env: dict | None = None) -> dict:
    """`python argv...` (`["-m", module, ...]` or `["-c", code, ...]`) in a fresh interpreter, so its peak counters
    hold that run alone; returns the JSON object it prints on its last stdout line (libraries may print lines of
    their own before it)."""
    completed = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout_s,
                               env={**os.environ, **(env or {})})
    if completed.returncode != 0:
        raise RuntimeError(f"child `python {argv[0]} {argv[1][:40]}` failed ({completed.returncode}): "
                           f"{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])
