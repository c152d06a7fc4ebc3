"""SIGINT or SIGTERM in the middle of a step: a checkpoint of the last whole step, exit 130, a resume command."""

import signal
import subprocess

import pytest

from memfit.train.checkpoint import list_checkpoints, open_checkpoint

from .conftest import env, metrics, train_command, wait_for


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_run_saves_a_checkpoint_and_exits_130(tiny_model_dir, tmp_path, signum):
    out = tmp_path / "run"
    process = subprocess.Popen(train_command(tiny_model_dir, out, "--max-steps", "5000"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env())
    wait_for(lambda: (out / "metrics.jsonl").exists() and len(metrics(out)) >= 3, process)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stdout + stderr
    assert f"interrupted ({signum.name})" in stdout and "resume with: memfit train --resume" in stdout
    assert "Traceback" not in stderr
    last = metrics(out)[-1]["step"]
    assert [open_checkpoint(path).step for path in list_checkpoints(out)] == [last]
