"""Helpers of the fault-injection suite: `memfit train` as a real process, with MEMFIT_FAULTS (memfit.faults)."""

import json
import os
import subprocess
import sys
import time
from importlib import resources

from memfit import faults

DEMO_DATA = str(resources.files("memfit").joinpath("data/demo.jsonl"))


def train_command(model_dir, out, *flags):
    # Without gradient checkpointing (on by default since issue 16): the memory figures these tests were measured
    # with (cgroup sizes, address-space limits, leaks against a limit) are those of the plain step.
    return [sys.executable, "-m", "memfit", "train", "--model", str(model_dir), "--data", DEMO_DATA,
            "--output-dir", str(out), "--seq-len", "64", "--batch-size", "4", "--device", "cpu",
            "--no-grad-checkpointing", *flags]


def env(fault=None):
    values = {**os.environ, "HF_HUB_OFFLINE": "1"}
    values.pop(faults.ENV, None)
    if fault:
        values[faults.ENV] = fault
    return values


def run(command, fault=None, timeout=300):
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env(fault))


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def wait_for(predicate, process, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError("timed out")
