"""`memfit train --supervise`: the training runs in a child process that this parent brings back when it dies.

The child is `python -m memfit.child life SPEC` (the same trainer as an unsupervised run). The parent never
loads the model, so it stays small and alive whatever the child does. It raises the child's `oom_score_adj` to
1000, so when the machine runs out of memory the kernel kills the trainer, not the user's browser or editor (raising
it needs no privilege). Each time the child ends:

| how it ended                          | what the parent does                                                    |
|---------------------------------------|-------------------------------------------------------------------------|
| 0 done                                | exits 0                                                                 |
| 75 reload (`--reload-interval`)       | starts it again from its checkpoint; not counted as a restart           |
| SIGKILL (the OOM killer), 3 guard stop| restarts from the newest good checkpoint with half the micro-batch      |
| 4 out of memory                       | the same; at micro-batch 1 (the torch engine halves in-process before   |
|                                       | that), 1 again: a fresh process has no fragmentation and no leaked      |
|                                       | memory. The MLX engine also exits 4 when its update fails part-way.     |
| another signal, another exit code     | restarts with the same micro-batch (a crash, a CUDA fault)              |
| 2 bad input or disk full, 130 Ctrl-C  | exits with that code: starting again would not help, or was not wanted  |

Restarts (not reloads) are counted against `--max-restarts`; past it the parent exits with the child's last code.
The effective batch never changes (a smaller micro-batch means more accumulation), and a resume is exact, so the
supervised run sees the same samples once each and ends where an unsupervised one would. Every life of the child is
logged in `supervisor.jsonl`, as a `ChildEnded` line in `events.jsonl`, in run.json's `supervisor` entry, and as
`attempt` in each metrics line.

Ctrl-C: the child runs in its own session, so the terminal's SIGINT reaches only the parent, which passes it on
once (a second Ctrl-C passes a second one: the child then aborts at once, as unsupervised). SIGTERM likewise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from memfit.errors import EXIT_GUARD_STOP, EXIT_INTERRUPTED, EXIT_OK, EXIT_OOM, EXIT_RELOAD, EXIT_USAGE
from memfit.events import ChildEnded, ChildStarted, Event
from memfit.train import checkpoint as ckpt
from memfit.files import write_atomic
from memfit.runtime import signals_handled
from memfit.train.rundir import EVENTS, RUN_JSON, SUPERVISOR_LOG

OOM_SCORE_ADJ = 1000  # the most killable: chosen first by the kernel's OOM killer


def _outcome(exit_code: int) -> str:
    if exit_code == -signal.SIGKILL:
        return "killed"
    return {EXIT_OK: "done", EXIT_RELOAD: "reload", EXIT_GUARD_STOP: "guard_stop", EXIT_OOM: "oom",
            EXIT_USAGE: "bad_input", EXIT_INTERRUPTED: "interrupted"}.get(exit_code, "crash")


def _describe(exit_code: int, outcome: str) -> str:
    if exit_code < 0:
        name = signal.Signals(-exit_code).name if -exit_code in signal.Signals._value2member_map_ else exit_code
        if outcome == "killed":
            return "killed by SIGKILL (the kernel's OOM killer, see `dmesg`, or another process)"
        return f"crashed with {name}"
    return {"done": "finished", "reload": "checkpointed for a reload", "guard_stop": "stopped by the memory guard",
            "oom": "out of memory at micro-batch 1", "bad_input": "failed on bad input or a full disk (exit 2)",
            "interrupted": "interrupted"}.get(outcome, f"crashed (exit {exit_code})")


def _set_oom_score_adj(pid: int, value: int) -> int | None:
    path = Path(f"/proc/{pid}/oom_score_adj")
    try:
        path.write_text(str(value))
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def _last_micro_batch(run_dir: Path) -> int | None:
    """The micro-batch of the child's last logged step (what it was running when it died)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["micro_batch"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def _newest_checkpoint_step(run_dir: Path) -> int | None:
    """The newest complete checkpoint's step, from its meta.json (the child verifies the checksums when it resumes:
    hashing a full model's checkpoint here would double the time a restart takes). A same-step replacement the dead
    child left between its two renames is finished first (ckpt.recover_replacements)."""
    ckpt.recover_replacements(run_dir)
    for path in reversed(ckpt.list_checkpoints(run_dir)):
        meta = ckpt.load_checkpoint_meta(path)
        if meta is not None:
            return int(meta["step"])
    return None


def _append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as file:
        file.write(json.dumps(record, default=str) + "\n")


class Supervisor:
    def __init__(self, job_fields: dict[str, Any], config_values: dict[str, Any], *, max_restarts: int,
                 reload_interval: int | None, on_event: Callable[[Event], None] | None = None):
        self.job_fields = job_fields  # TrainJob's fields as JSON values (model, data, output_dir, ...)
        self.config_values = config_values
        self.run_dir = Path(job_fields["output_dir"])
        self.max_restarts = max_restarts
        self.reload_interval = reload_interval
        self.on_event = on_event or (lambda event: None)
        self.child: subprocess.Popen | None = None
        self.signals: list[int] = []
        self.lives: list[dict[str, Any]] = []

    def _emit(self, event: Event) -> None:
        self.on_event(event)

    def _on_signal(self, signum, frame) -> None:
        self.signals.append(signum)
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def run(self) -> int:
        with signals_handled(self._on_signal):
            return self._loop()

    def _loop(self) -> int:
        restarts, attempt, max_micro_batch = 0, 0, None
        resume = self.job_fields.get("resume")
        fresh = resume is None
        with tempfile.TemporaryDirectory(prefix="memfit-supervise-") as spec_dir:
            while True:
                spec = {"job": {**self.job_fields, "resume": resume, "fresh_restart": fresh and attempt > 0,
                                "max_micro_batch": max_micro_batch, "reload_after": self.reload_interval,
                                "attempt": attempt},
                        "config": self.config_values, "supervisor_pid": os.getpid()}
                spec_path = Path(spec_dir) / f"spec-{attempt}.json"
                spec_path.write_text(json.dumps(spec, default=str))
                exit_code = self._run_child(spec_path, attempt, resume, max_micro_batch)
                outcome = _outcome(exit_code)
                step = _newest_checkpoint_step(self.run_dir)
                if outcome in ("done", "bad_input", "interrupted") or self.signals:
                    action = "exit"
                elif outcome == "reload":
                    action = "reload"
                elif restarts >= self.max_restarts:
                    action = "give_up"
                else:
                    action = "restart"
                    restarts += 1
                    if outcome in ("killed", "guard_stop", "oom"):
                        micro = _last_micro_batch(self.run_dir) or self.config_values["batch_size"]
                        max_micro_batch = max(1, min(micro, max_micro_batch or micro) // 2)
                message = self._message(exit_code, outcome, action, step, restarts, max_micro_batch)
                self._record(ChildEnded(attempt, step or 0, exit_code, outcome, action, message,
                                        max_micro_batch if action in ("restart", "reload") else None))
                if action in ("exit", "give_up"):  # (the entry point's report covers every life: memfit.report)
                    return self._exit_code(exit_code, outcome)
                if step is not None:
                    resume = str(self.run_dir)  # the child resumes from its newest checkpoint that verifies
                attempt += 1

    def _exit_code(self, exit_code: int, outcome: str) -> int:
        """The child's own code; for a child killed by a signal, what that means in memfit's codes."""
        if exit_code >= 0:
            return exit_code
        if self.signals:
            return EXIT_INTERRUPTED
        return EXIT_OOM if outcome == "killed" else 1

    def _message(self, exit_code: int, outcome: str, action: str, step: int | None, restarts: int,
                 max_micro_batch: int | None) -> str:
        what = _describe(exit_code, outcome)
        if action == "exit":
            return what
        if action == "give_up":
            return f"{what}; not restarting: {self.max_restarts} restarts used (--max-restarts)"
        where = f"from the checkpoint of step {step}" if step else "from the start (no checkpoint yet)"
        smaller = f", micro-batch at most {max_micro_batch}" if max_micro_batch else ""
        if action == "reload":
            return f"{what}: starting again {where}{smaller}"
        return f"{what}: restart {restarts} of {self.max_restarts}, {where}{smaller}"

    def _run_child(self, spec_path: Path, attempt: int, resume: str | None, max_micro_batch: int | None) -> int:
        command = [sys.executable, "-m", "memfit.child", "life", str(spec_path)]
        # A session of its own: Ctrl-C reaches the parent only, which passes it on once (see the module docstring).
        self.child = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            adj = _set_oom_score_adj(self.child.pid, OOM_SCORE_ADJ)
            self._record(ChildStarted(attempt, self.child.pid, adj, resume, max_micro_batch))
            return self.child.wait()
        except BaseException:  # a bug here, or a third-party signal handler: never leave a training child behind
            if self.child.poll() is None:
                self.child.kill()
                self.child.wait()
            raise
        finally:
            self.child = None

    def _record(self, event: Event) -> None:
        """Into supervisor.jsonl (every event), events.jsonl and run.json (each life's end), then to the caller."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        record = {**event.to_dict(), "time": time.time()}
        _append(self.run_dir / SUPERVISOR_LOG, record)
        if isinstance(event, ChildEnded):
            # events.jsonl keeps lines up to the step a resume starts from: this one's step is exactly that.
            _append(self.run_dir / EVENTS, record)
            self.lives.append(asdict(event))
            try:
                run_json = json.loads((self.run_dir / RUN_JSON).read_text())
            except (OSError, ValueError):
                run_json = {}
            run_json["supervisor"] = {"max_restarts": self.max_restarts, "reload_interval": self.reload_interval,
                                      "restarts": sum(life["action"] == "restart" for life in self.lives),
                                      "reloads": sum(life["action"] == "reload" for life in self.lives),
                                      "lives": self.lives}
            write_atomic(self.run_dir / RUN_JSON, json.dumps(run_json, indent=2, default=str) + "\n")
        self._emit(event)


def supervise(job_fields: dict[str, Any], config_values: dict[str, Any], *, max_restarts: int = 3,
              reload_interval: int | None = None, on_event: Callable[[Event], None] | None = None) -> int:
    """Run the training in a child process, bringing it back as the module docstring says; the exit code."""
    return Supervisor(job_fields, config_values, max_restarts=max_restarts, reload_interval=reload_interval,
                      on_event=on_event).run()
