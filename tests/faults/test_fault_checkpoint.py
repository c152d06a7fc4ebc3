"""Checkpoints under faults: killed mid-write or between the renames of a same-step replacement, disk full,
corrupted, resumed with a changed config."""

import json
import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file

from memfit.train.checkpoint import (list_checkpoints, open_checkpoint, remove_partial_checkpoints,
                                     save_checkpoint, verify_checkpoint)

from .conftest import env, metrics, run, train_command, wait_for


def _steps(out):
    return [line["step"] for line in metrics(out)]


def test_kill_during_checkpoint_write_leaves_the_previous_one_resumable(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(train_command(tiny_model_dir, out, "--max-steps", "8", "--save-every", "2"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env("save_pause@4:60"))
    wait_for(lambda: any((out / "checkpoints").glob(".tmp-step-4-*/.paused")), process)
    process.kill()  # SIGKILL: no handler, no cleanup, a half-written step-4 on disk
    process.wait(timeout=30)
    assert [path.name for path in list_checkpoints(out)] == ["step-2"]

    resumed = run([sys.executable, "-m", "memfit", "train", "--resume", "--output-dir", str(out)])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "a checkpoint write that did not finish" in resumed.stdout
    assert f"resumed from {out / 'checkpoints' / 'step-2'} at step 2" in resumed.stdout
    assert _steps(out) == list(range(1, 9))
    assert not list((out / "checkpoints").glob(".tmp-*")) and (out / "final" / "adapter_model.safetensors").exists()


def test_disk_full_while_saving_is_one_line_and_the_previous_checkpoint_stays(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    failed = run(train_command(tiny_model_dir, out, "--max-steps", "8", "--save-every", "2"), fault="enospc@4")
    assert failed.returncode == 2, failed.stdout + failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert "could not write checkpoint step-4" in lines[0] and "No space left on device" in lines[0]
    assert "previous checkpoint is intact" in lines[0]
    assert [path.name for path in list_checkpoints(out)] == ["step-2"]
    assert verify_checkpoint(out / "checkpoints" / "step-2") is None
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert json.loads((out / "run.json").read_text())["status"] == "disk_full"

    resumed = run([sys.executable, "-m", "memfit", "train", "--resume", "--output-dir", str(out)])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert _steps(out) == list(range(1, 9))


def test_a_real_write_limit_is_recognised_as_a_full_disk(tmp_path):
    # No fault hook: RLIMIT_FSIZE makes the kernel refuse the write (EFBIG), as a full disk refuses it (ENOSPC).
    # safetensors and torch.save report it in their own words, not as OSError; the checkpoint code must still
    # tell a full disk from a bug, clean up, and say so in one line.
    script = f"""
import resource, signal, sys, torch
from pathlib import Path
from memfit.errors import DiskFullError
from memfit.train.checkpoint import save_checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
model = torch.nn.Linear(256, 256)
optimizer = torch.optim.AdamW(model.parameters())
model(torch.ones(1, 256)).sum().backward(); optimizer.step()
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
run_dir = Path({str(tmp_path)!r})
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
try:
    save_checkpoint(run_dir, 1, model=model, optimizer=optimizer, scheduler=scheduler, trainer_state={{}}, meta={{}},
                    keep=2)
except DiskFullError as error:
    print("DiskFullError", error)
    sys.exit(0)
sys.exit(1)
"""
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "could not write checkpoint step-1" in completed.stdout and "File too large" in completed.stdout
    assert list((tmp_path / "checkpoints").iterdir()) == []  # nothing half-written left


def test_a_corrupted_checkpoint_is_refused_and_the_previous_one_used(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    first = run(train_command(tiny_model_dir, out, "--max-steps", "8", "--save-every", "2"))
    assert first.returncode == 0, first.stderr
    newest = out / "checkpoints" / "step-8"
    weights = newest / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the tensors: the size is right, the checksum is not
    weights.write_bytes(bytes(data))
    shutil.rmtree(out / "final")

    named = run([sys.executable, "-m", "memfit", "train", "--resume", str(newest)])
    assert named.returncode == 2 and "Traceback" not in named.stderr
    assert f"checkpoint {newest} cannot be resumed: trainable.safetensors does not match its checksum" in named.stderr

    latest = run([sys.executable, "-m", "memfit", "train", "--resume", "--output-dir", str(out)])
    assert latest.returncode == 0, latest.stdout + latest.stderr
    assert f"skipped {newest}: trainable.safetensors does not match its checksum" in latest.stdout
    assert f"resumed from {out / 'checkpoints' / 'step-6'} at step 6" in latest.stdout
    assert _steps(out) == list(range(1, 9)) and verify_checkpoint(newest) is None  # step 8 written again


def test_resume_with_a_changed_config_is_refused_unless_forced(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert run(train_command(tiny_model_dir, out, "--max-steps", "4", "--save-every", "2", "--lr", "0.01")).returncode == 0
    checkpoint = str(out / "checkpoints" / "step-2")
    refused = run([sys.executable, "-m", "memfit", "train", "--resume", checkpoint, "--lr", "0.5"])
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "breaks exactness" in refused.stderr and "--lr 0.01 -> 0.5" in refused.stderr and "--force" in refused.stderr
    forced = run([sys.executable, "-m", "memfit", "train", "--resume", checkpoint, "--lr", "0.5", "--force"])
    assert forced.returncode == 0, forced.stdout + forced.stderr
    # The new step-4 replaced the one the first run wrote.
    assert open_checkpoint(out).meta["config"]["lr"] == 0.5
    # The micro-batch split and the guard settings may change: the same samples, the same effective batch.
    split = run([sys.executable, "-m", "memfit", "train", "--resume", checkpoint, "--batch-size", "2",
                 "--grad-accum", "2", "--max-memory", "20"])
    assert split.returncode == 0, split.stdout + split.stderr


def test_kill_between_the_two_renames_of_a_same_step_checkpoint_loses_nothing(tiny_model_dir, tmp_path):
    """A resume from step-2 trains steps 3-4 again and writes step-4 over the first run's: the old copy is moved
    aside, then the new one renamed into place. rename_pause@4 holds the process between the two renames, where
    no `step-4` exists, and SIGKILL ends it there. The next resume must still find step 4 (either copy, both
    complete) and lose no step. Over 30 s on a busy 2-core machine (63 s at load 4): three processes (the first
    run, the killed one, the resume), each paying for its imports."""
    out = tmp_path / "run"
    first = run(train_command(tiny_model_dir, out, "--max-steps", "4", "--save-every", "2"))
    assert first.returncode == 0, first.stdout + first.stderr
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    shutil.rmtree(out / "final")

    resume_step_2 = [sys.executable, "-m", "memfit", "train", "--resume", str(out / "checkpoints" / "step-2")]
    process = subprocess.Popen(resume_step_2, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=env("rename_pause@4:60"))
    wait_for(lambda: (out / ".fault-rename_pause-4").exists(), process)
    process.kill()
    process.wait(timeout=30)
    assert not (out / "checkpoints" / "step-4").exists()  # killed inside the window
    assert [path.name for path in list_checkpoints(out)] == ["step-2"]

    resumed = run([sys.executable, "-m", "memfit", "train", "--resume", "--output-dir", str(out)])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "checkpoint step-4: its new copy was complete" in resumed.stdout
    assert f"resumed from {out / 'checkpoints' / 'step-4'} at step 4" in resumed.stdout
    assert _steps(out) == [1, 2, 3, 4]
    assert verify_checkpoint(out / "checkpoints" / "step-4") is None
    assert not [path.name for path in (out / "checkpoints").iterdir() if path.name.startswith(".")]
    # An exact resume from the step-4 the killed process wrote: the first run's adapter, bit for bit.
    resumed_adapter = load_file(out / "final" / "adapter_model.safetensors")
    assert adapter.keys() == resumed_adapter.keys()
    assert all(torch.equal(adapter[name], resumed_adapter[name]) for name in adapter)


def test_a_replacement_cut_short_puts_the_previous_copy_back_when_the_new_one_is_incomplete(tmp_path):
    # The other branch of the recovery, without training: a process died between the two renames while its new
    # copy was damaged (here: a file cut short), so the copy it moved aside is the only good one of that step.
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def save():
        return save_checkpoint(tmp_path, 3, model=model, optimizer=optimizer, scheduler=scheduler,
                               trainer_state={"step": 3}, meta={}, keep=3)

    final = save()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has ended: its replacement is not in progress
    new = final.parent / f".tmp-step-3-{pid}"
    shutil.copytree(final, new)
    (new / "optimizer.pt").write_bytes((new / "optimizer.pt").read_bytes()[:-1])
    os.rename(final, final.parent / f".replaced-step-3-{pid}")
    assert list_checkpoints(tmp_path) == []

    checkpoint = open_checkpoint(tmp_path)
    assert checkpoint.path == final and checkpoint.recovered == (
        "step-3: its replacement did not finish; the previous copy put back",)
    assert verify_checkpoint(final) is None
    assert sorted(path.name for path in final.parent.iterdir()) == [f".tmp-step-3-{pid}", "step-3"]
    assert remove_partial_checkpoints(tmp_path) == [new] and list(final.parent.iterdir()) == [final]
