"""SIGINT or SIGTERM in the middle of a step: a checkpoint of the last whole step, exit 130, a resume command; a
second SIGINT aborts at once."""

import json
import signal
import subprocess
import time

import pytest

from memfit.train.checkpoint import list_checkpoints, open_checkpoint, verify_checkpoint

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


def test_a_second_ctrl_c_aborts_at_once_and_the_previous_checkpoint_stays_good(tiny_model_dir, tmp_path):
    # save_pause@4:60 holds step 4's checkpoint write for 60 s. The first SIGINT asks for the checkpointed stop,
    # which has to wait for that write; the second aborts at once (README: "a second signal aborts at once (the
    # previous checkpoint stays good)"), leaving a half-written step-4 that is never listed.
    out = tmp_path / "run"
    process = subprocess.Popen(train_command(tiny_model_dir, out, "--max-steps", "8", "--save-every", "2"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env("save_pause@4:60"))
    wait_for(lambda: any((out / "checkpoints").glob(".tmp-step-4-*/.paused")), process)
    process.send_signal(signal.SIGINT)
    time.sleep(1.0)
    assert process.poll() is None  # the first one waits for the safe point: it does not abort
    process.send_signal(signal.SIGINT)
    sent = time.monotonic()
    stdout, stderr = process.communicate(timeout=60)
    assert time.monotonic() - sent < 10, "the second Ctrl-C did not abort at once"
    assert process.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr, stderr
    assert f"aborted by a second SIGINT: the step in flight and any checkpoint being written are dropped; resume " \
           f"from the newest complete checkpoint with `memfit train --resume {out}`" in " ".join(stdout.split())
    assert json.loads((out / "run.json").read_text())["status"] == "aborted"
    assert [path.name for path in list_checkpoints(out)] == ["step-2"]
    assert verify_checkpoint(out / "checkpoints" / "step-2") is None
