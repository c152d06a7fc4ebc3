"""memfit train as a process: the guard's exit 3, SIGINT's 130, and kill -9 in the middle of a checkpoint write."""

import json
import os
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

from memfit.train.checkpoint import list_checkpoints, open_checkpoint

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


def _wait_for(predicate, process, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_memory_limit_stops_with_checkpoint_report_and_resume_command(tiny_model_dir, tmp_path):
    """A leak (100 MB a step) against a limit ~0.4 GB above what the run needs: exit 3, then resume goes on."""
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
    checkpoint = Path(resume_line.split("--resume ", 1)[1])
    step = open_checkpoint(checkpoint).step  # verifies every checksum
    assert 0 < step < 40 and _steps(out)[-1] == step
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "guard_stop" and run["exit_code"] == 3
    assert run["peak_watched_bytes"] <= limit_gb * GB * 1.10  # stopped close to the limit, not far past it

    resumed = _run([sys.executable, "-m", "memfit", "train", "--resume", str(checkpoint), "--max-memory", "16"])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {checkpoint} at step {step}" in resumed.stdout
    assert _steps(out) == list(range(1, 41))


def test_sigint_saves_a_checkpoint_and_exits_130(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(_command(tiny_model_dir, out, "--max-steps", "5000"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=_env())
    _wait_for(lambda: (out / "metrics.jsonl").exists() and len(_steps(out)) >= 3, process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stdout + stderr
    assert "interrupted (SIGINT)" in stdout and "resume with: memfit train --resume" in stdout
    last = _steps(out)[-1]
    assert [open_checkpoint(path).step for path in list_checkpoints(out)] == [last]


def test_kill_during_checkpoint_write_leaves_the_previous_one_resumable(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(_command(tiny_model_dir, out, "--max-steps", "8", "--save-every", "2"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env("save_pause@4:60"))
    _wait_for(lambda: any((out / "checkpoints").glob(".tmp-step-4-*/.paused")), process)
    process.kill()  # SIGKILL: no handler, no cleanup, a half-written step-4 on disk
    process.wait(timeout=30)
    assert [path.name for path in list_checkpoints(out)] == ["step-2"]

    resumed = _run([sys.executable, "-m", "memfit", "train", "--resume", "--output-dir", str(out)])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "a checkpoint write that did not finish" in resumed.stdout
    assert f"resumed from {out / 'checkpoints' / 'step-2'} at step 2" in resumed.stdout
    assert _steps(out) == list(range(1, 9))
    assert not list((out / "checkpoints").glob(".tmp-*")) and (out / "final" / "adapter_model.safetensors").exists()
