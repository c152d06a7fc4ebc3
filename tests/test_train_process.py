"""memfit train as a process: the guard's exit 3 (the other process-level faults are in tests/faults/)."""

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

from memfit.train.checkpoint import open_checkpoint

DEMO_DATA = str(resources.files("memfit").joinpath("data/demo.jsonl"))
GB = 1024**3


def _command(model_dir, out, *flags):
    return [sys.executable, "-m", "memfit", "train", "--model", str(model_dir), "--data", DEMO_DATA,
            "--output-dir", str(out), "--seq-len", "64", "--batch-size", "4", "--device", "cpu", *flags]


def _env(faults=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MEMFIT_FAULTS", None)
    if faults:
        env["MEMFIT_FAULTS"] = faults
    return env


def _run(command, faults=None, timeout=300):
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env(faults))


def _steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_memory_limit_stops_with_checkpoint_report_and_resume_command(tiny_model_dir, tmp_path):
    """A leak (100 MB a step) against a limit ~0.4 GB above what the run needs: exit 3, then resume goes on. Slow (30-70
    s): two real training processes (the stopped run and its resume), with the leak growing to the limit step by
    step."""
    out = tmp_path / "run"
    baseline = _run(_command(tiny_model_dir, tmp_path / "probe", "--max-steps", "2"))
    assert baseline.returncode == 0, baseline.stderr
    peak = max(json.loads(line)["peak_rss_bytes"] for line in (tmp_path / "probe" / "metrics.jsonl").open())
    limit_gb = round((peak + 0.4 * GB) / GB, 2)
    stopped = _run(_command(tiny_model_dir, out, "--max-steps", "40", "--max-memory", str(limit_gb)),
                   faults="leak@100")
    assert stopped.returncode == 3, stopped.stdout + stopped.stderr
    text = stopped.stdout
    assert "Memory Usage Report" in text and "OVER THRESHOLD" in text and "stopped by the memory guard" in text
    assert f"Memory limit: {limit_gb:.2f} GB" in text
    resume_line = next(line for line in text.splitlines() if line.startswith("resume with: "))
    checkpoint = Path(resume_line.split("--resume ", 1)[1].split(" --")[0])
    # A resume that can succeed: a higher limit than the one that stopped it (this machine has the room).
    assert float(resume_line.split("--max-memory ", 1)[1].split()[0]) > limit_gb
    step = open_checkpoint(checkpoint).step  # verifies every checksum
    assert 0 < step < 40 and _steps(out)[-1] == step
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "guard_stop" and run["exit_code"] == 3
    # Stopped close to the limit, not far past it: at most one step's leak (100 MB, taken at once, so a reading
    # can come only after it) and 5% of sampling noise above. (At most 10% above, as this was, is less than one
    # leak at this ~0.85 GB limit: it failed when the leak landed just before a reading.)
    assert run["peak_watched_bytes"] <= limit_gb * GB * 1.05 + 100 * 2**20

    resumed = _run([sys.executable, "-m", "memfit", "train", "--resume", str(checkpoint), "--max-memory", "16"])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {checkpoint} at step {step}" in resumed.stdout
    assert _steps(out) == list(range(1, 41))
