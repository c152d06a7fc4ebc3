"""`memfit train --supervise`: the trainer in a child process, brought back from its checkpoint when it dies."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import env, metrics, run, train_command, wait_for

STEPS = ("--max-steps", "8", "--save-every", "2", "--lr", "0.01")


def _adapter(out):
    return load_file(out / "final" / "adapter_model.safetensors")


def _lives(out):
    return json.loads((out / "run.json").read_text())["supervisor"]["lives"]


def _supervisor_log(out):
    return [json.loads(line) for line in (out / "supervisor.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def unsupervised(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("unsupervised") / "run"
    completed = run(train_command(tiny_model_dir, out, *STEPS))
    assert completed.returncode == 0, completed.stderr
    return out


def test_an_oom_killed_child_is_resumed_with_half_the_micro_batch_and_finishes(tiny_model_dir, tmp_path,
                                                                               unsupervised):
    # sigkill@5: the process training step 5 gets SIGKILL, as from the kernel's OOM killer (once per run dir).
    out = tmp_path / "run"
    completed = run(train_command(tiny_model_dir, out, *STEPS, "--supervise"), fault="sigkill@5")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "killed by SIGKILL" in completed.stdout and "restart 1 of 3, from the checkpoint of step 4" in completed.stdout
    lives = _lives(out)
    assert [(life["outcome"], life["action"]) for life in lives] == [("killed", "restart"), ("done", "exit")]
    assert lives[0]["exit_code"] == -signal.SIGKILL and lives[0]["micro_batch"] == 2
    started = [line for line in _supervisor_log(out) if line["event"] == "ChildStarted"]
    assert all(line["oom_score_adj"] == 1000 for line in started)  # the kernel kills the trainer first
    assert any(line["event"] == "ChildEnded" and line["outcome"] == "killed"
               for line in map(json.loads, (out / "events.jsonl").read_text().splitlines()))

    steps = metrics(out)
    assert [m["step"] for m in steps] == list(range(1, 9))  # steps 1-4 kept, 5-8 trained once by the second life
    assert [(m["attempt"], m["micro_batch"], m["grad_accum"]) for m in steps] == [(0, 4, 1)] * 4 + [(1, 2, 2)] * 4
    # The same samples in the same steps as without supervision: the same run up to float summation order.
    assert [m["tokens"] for m in steps] == [m["tokens"] for m in metrics(unsupervised)]
    assert [m["loss"] for m in steps] == pytest.approx([m["loss"] for m in metrics(unsupervised)], rel=1e-4)
    ours, theirs = _adapter(out), _adapter(unsupervised)
    assert all(torch.allclose(ours[name], theirs[name], atol=1e-5) for name in theirs)


def test_reload_interval_restarts_the_child_and_changes_nothing(tiny_model_dir, tmp_path, unsupervised):
    out = tmp_path / "run"
    completed = run(train_command(tiny_model_dir, out, *STEPS, "--supervise", "--reload-interval", "3"))
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lives = _lives(out)
    assert [(life["action"], life["step"]) for life in lives] == [("reload", 3), ("reload", 6), ("exit", 8)]
    assert json.loads((out / "run.json").read_text())["supervisor"]["restarts"] == 0  # reloads are not restarts
    steps = metrics(out)
    assert [m["attempt"] for m in steps] == [0, 0, 0, 1, 1, 1, 2, 2]
    # An exact resume each time: bit-identical to the run that was never restarted.
    assert [(m["step"], m["loss"]) for m in steps] == [(m["step"], m["loss"]) for m in metrics(unsupervised)]
    ours, theirs = _adapter(out), _adapter(unsupervised)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in theirs)


def test_a_crash_is_restarted_with_the_same_micro_batch(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    completed = run(train_command(tiny_model_dir, out, *STEPS, "--supervise"), fault="crash@3")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lives = _lives(out)
    assert [(life["outcome"], life["exit_code"]) for life in lives] == [("crash", 1), ("done", 0)]
    assert lives[0]["micro_batch"] is None and {m["micro_batch"] for m in metrics(out)} == {4}
    assert [m["step"] for m in metrics(out)] == list(range(1, 9))


def test_restarts_stop_at_max_restarts(tiny_model_dir, tmp_path):
    # Killed before its first checkpoint every time (sigkill is once per run dir: kill at step 1, then oomkill at
    # 1 MB kills every later life as it starts sampling): the run gives up, exit 4, nothing left running.
    out = tmp_path / "run"
    completed = run(train_command(tiny_model_dir, out, *STEPS, "--supervise", "--max-restarts", "2"),
                    fault="oomkill@1")
    assert completed.returncode == 4, completed.stdout + completed.stderr
    lives = _lives(out)
    assert [life["action"] for life in lives] == ["restart", "restart", "give_up"]
    assert "not restarting: 2 restarts used" in completed.stdout


def test_bad_input_is_not_restarted(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 5}\n')
    command = train_command(tiny_model_dir, tmp_path / "run", *STEPS, "--supervise")
    command[command.index("--data") + 1] = str(bad)
    completed = run(command)
    assert completed.returncode == 2 and "bad.jsonl:2" in completed.stderr and "Traceback" not in completed.stderr
    assert completed.stdout.count("trainer process") == 1


def test_ctrl_c_reaches_the_child_once_and_ends_the_supervised_run(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(train_command(tiny_model_dir, out, "--max-steps", "5000", "--supervise"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    wait_for(lambda: (out / "metrics.jsonl").exists() and len(metrics(out)) >= 3, process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stdout + stderr
    assert "interrupted (SIGINT)" in stdout  # one signal: the child checkpointed (a second would abort it)
    assert [life["action"] for life in _lives(out)] == ["exit"]
    assert (out / "checkpoints" / f"step-{metrics(out)[-1]['step']}").is_dir()


def test_reload_interval_without_supervise_is_refused(tiny_model_dir, tmp_path):
    completed = run(train_command(tiny_model_dir, tmp_path / "run", "--reload-interval", "5"))
    assert completed.returncode == 2 and "--reload-interval needs --supervise" in completed.stderr


def test_an_unrecoverable_oom_is_restarted_then_given_up(tiny_model_dir, tmp_path):
    # oom@3+: every attempt of step 3 runs out of memory, micro-batch 1 included (exit 4), in every life.
    out = tmp_path / "run"
    completed = run(train_command(tiny_model_dir, out, *STEPS, "--batch-size", "2", "--supervise",
                                  "--max-restarts", "1"), fault="oom@3+")
    assert completed.returncode == 4, completed.stdout + completed.stderr
    assert [(life["outcome"], life["action"], life["step"]) for life in _lives(out)] == [
        ("oom", "restart", 2), ("oom", "give_up", 2)]
    # The first life halved its micro-batch to 1 in-process before exit 4; the restart keeps it at 1 (an MLX child,
    # which exits 4 when its update fails part-way at any micro-batch, is restarted with half of it).
    assert [life["micro_batch"] for life in _lives(out)] == [1, None]


@contextlib.contextmanager
def _memory_cgroup(limit_bytes):
    """A memory cgroup of `limit_bytes` (v1 or v2), for a real kernel OOM kill; skips where none can be made."""
    for root, limit_file, swap_file in ((Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes",
                                         "memory.memsw.limit_in_bytes"),
                                        (Path("/sys/fs/cgroup"), "memory.max", "memory.swap.max")):
        if (root / "cgroup.procs").exists() and (limit_file != "memory.max" or "memory" in _read(
                root / "cgroup.subtree_control")):
            break
    else:
        pytest.skip("no memory cgroup hierarchy here")
    path = root / f"memfit-test-{os.getpid()}"
    try:
        path.mkdir()
        (path / limit_file).write_text(str(limit_bytes))
        if (path / swap_file).exists():  # no swapping out of the limit: the OOM killer must act
            (path / swap_file).write_text("0" if swap_file == "memory.swap.max" else str(limit_bytes))
    except OSError as error:
        if path.exists():
            _remove_cgroup(path)
        pytest.skip(f"cannot create a memory cgroup here: {error}")
    try:
        yield path
    finally:
        _remove_cgroup(path)


def _read(path):
    try:
        return path.read_text()
    except OSError:
        return ""


def _remove_cgroup(path):
    for _ in range(50):  # the killed processes leave the group a moment after they are reaped
        try:
            path.rmdir()
            return
        except OSError:
            time.sleep(0.1)


def test_a_real_kernel_oom_kill_is_survived_and_the_run_finishes_smaller(tiny_model_dir, tmp_path):
    # The supervised run inside a 1500 MiB memory cgroup: batch 64 x 512 tokens peaks at 1.82 GB in the trainer
    # (plus ~0.25 GB for the supervisor), 32 x 512 at 1.12 GB (tiny model, `/usr/bin/time -v` of the same
    # command unsupervised, with memfit's fused gated MLP: 48 x 512, this test's batch before it, fell from 1.72 to
    # 1.47 GB and no longer overflowed). The kernel's OOM killer picks the trainer (oom_score_adj 1000), never the
    # supervisor, which restarts it with micro-batch 32 (x 2).
    out = tmp_path / "run"
    command = train_command(tiny_model_dir, out, "--max-steps", "3", "--save-every", "2", "--max-memory", "16",
                            "--supervise")
    command[command.index("--seq-len") + 1] = "512"
    command[command.index("--batch-size") + 1] = "64"
    with _memory_cgroup(1500 * 1024**2) as cgroup:
        completed = run(["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *command],
                        timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    lives = _lives(out)
    assert lives[0]["exit_code"] == -signal.SIGKILL and lives[0]["outcome"] == "killed", lives
    assert lives[-1]["outcome"] == "done" and lives[0]["micro_batch"] == 32
    steps = metrics(out)
    # Each step once: killed before its first checkpoint (started over) or after the one at step 2 (resumed there),
    # depending on a few MB of the process's baseline. What the killed life trained stays; the rest is 32 x 2.
    assert [m["step"] for m in steps] == [1, 2, 3]
    shapes = [(m["micro_batch"], m["grad_accum"]) for m in steps]
    assert shapes[-1] == (32, 2) and set(shapes) <= {(64, 1), (32, 2)}
    assert shapes == sorted(shapes, reverse=True)  # never back to 64 after the kill


def test_in_a_memory_cgroup_the_guard_stops_before_the_kernel_kills(tiny_model_dir, tmp_path):
    # A 1.6 GB container on a machine with far more free memory: the auto limit comes from what the cgroup has
    # left (80% of it, ~1.03 GB), so batch 48 x 512 (peak 1.24 GB unguarded: /usr/bin/time -v of the same command
    # with --max-memory 10, no cgroup; 32 x 512 fell to 0.97 GB with the fused RMSNorm and no longer reached the
    # limit) is stopped by the guard with a checkpoint (exit 3), where a limit from the machine's MemAvailable would
    # let it run into the cgroup's wall.
    out = tmp_path / "run"
    command = train_command(tiny_model_dir, out, "--max-steps", "3")
    command[command.index("--seq-len") + 1] = "512"
    command[command.index("--batch-size") + 1] = "48"
    with _memory_cgroup(1600 * 1024**2) as cgroup:
        inside = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh"]
        system = run([*inside, sys.executable, "-m", "memfit", "system", "--json"])
        completed = run([*inside, *command], timeout=600)
    info = json.loads(system.stdout)
    assert info["cgroup_limit_bytes"] == 1600 * 1024**2 and info["ram_available_bytes"] <= 1600 * 1024**2
    assert completed.returncode == 3, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "inside a 1.56 GB cgroup limit" in completed.stdout and "stopped by the memory guard" in completed.stdout
    # The checkpoint holds the last finished step: the guard may stop at step 1's end or, rising inside its
    # forward pass, at a decoder layer (the step dropped: step-0, the starting weights).
    finished = [line["step"] for line in metrics(out)] if (out / "metrics.jsonl").exists() else []
    saved = sorted(path.name for path in (out / "checkpoints").iterdir())
    assert saved == [f"step-{finished[-1] if finished else 0}"], (saved, finished)


def _gone(pid):
    """No such process, or a zombie (dead; its new parent, init here, has not reaped it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def test_a_killed_supervisor_takes_its_trainer_with_it(tiny_model_dir, tmp_path):
    # SIGKILL to the supervisor: no handler runs in it, so only the kernel can tell the child (PR_SET_PDEATHSIG,
    # SIGTERM). The trainer then stops as on any SIGTERM: a checkpoint of its last step, exit 130. None left running.
    out, output = tmp_path / "run", tmp_path / "output.txt"
    with open(output, "w") as file:  # the supervisor's and the trainer's output, to explain a failure
        process = subprocess.Popen(train_command(tiny_model_dir, out, "--max-steps", "5000", "--supervise"),
                                   stdout=file, stderr=subprocess.STDOUT, env=env())
    try:
        wait_for(lambda: (out / "metrics.jsonl").exists() and len(metrics(out)) >= 2, process)
        child = next(line["pid"] for line in _supervisor_log(out) if line["event"] == "ChildStarted")
        assert not _gone(child)
        process.kill()
        process.wait(timeout=30)
        deadline = time.monotonic() + 20
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(child), f"the trainer (pid {child}) outlived its supervisor"
    finally:
        if process.poll() is None:
            process.kill()
        with contextlib.suppress(NameError, ProcessLookupError):
            if not _gone(child):
                os.kill(child, signal.SIGKILL)  # never leave a trainer behind, even when the assertion failed
    run_json = json.loads((out / "run.json").read_text())
    # It took the SIGTERM path.
    assert (run_json["status"], run_json.get("exit_code")) == ("interrupted", 130), output.read_text()[-3000:]
    assert (out / "checkpoints" / f"step-{run_json['step']}").is_dir()
