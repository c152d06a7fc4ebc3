"""What a run directory holds, read for the report: tolerant of every way a run can end early.

A run killed mid-write leaves a cut last line in a JSONL file; a run killed before its end has no `RunEnded`;
an old or hand-copied run dir may lack run.json or config.yaml; a supervised run has several lives. None of these
stops the report: what is missing is listed in `problems` and shown on the page.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from memfit.errors import UserError
from memfit.train.checkpoint import list_checkpoints, load_checkpoint_meta
from memfit.train.rundir import CONFIG_YAML, EVENTS, FINAL, METRICS, RUN_JSON, SUPERVISOR_LOG

# How each status reads on the page, and the exit code it has when run.json does not say.
STATUS_TEXT = {"done": "finished", "guard_stop": "stopped by the memory guard", "oom": "out of memory",
               "interrupted": "interrupted", "disk_full": "disk full", "reload": "reloading (supervised)",
               "running": "did not finish (killed, or still running)"}


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The JSON object lines of `path` and how many lines were not (a line cut by a kill, a stray write)."""
    records, bad = [], 0
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    return records, bad


@dataclass
class CheckpointInfo:
    step: int
    path: Path
    reason: str | None
    complete: bool  # meta.json present and readable (an unfinished write has none)
    seconds: float | None = None


@dataclass
class RunData:
    path: Path
    run: dict[str, Any]
    config: dict[str, Any]
    steps: list[dict[str, Any]]
    events: list[dict[str, Any]]
    supervisor: list[dict[str, Any]]
    checkpoints: list[CheckpointInfo]
    problems: list[str] = field(default_factory=list)

    # --- how it ended ------------------------------------------------------------------------------------------

    def _last_event(self, name: str) -> dict[str, Any] | None:
        return next((event for event in reversed(self.events) if event.get("event") == name), None)

    @property
    def ended(self) -> dict[str, Any] | None:
        return self._last_event("RunEnded")

    @property
    def final_life(self) -> dict[str, Any] | None:
        """The supervisor's last ChildEnded, when the run was supervised and the supervisor has finished."""
        return next((record for record in reversed(self.supervisor) if record.get("event") == "ChildEnded"
                     and record.get("action") in ("exit", "give_up")), None)

    @property
    def status(self) -> str:
        ended = self.ended
        return self.run.get("status") or (ended or {}).get("status") or "running"

    @property
    def exit_code(self) -> int | None:
        life = self.final_life
        if life is not None:
            return _supervised_exit_code(life)
        if "exit_code" in self.run:
            return self.run["exit_code"]
        ended = self.ended
        return ended.get("exit_code") if ended else None

    @property
    def stop_message(self) -> str:
        """Why the run ended, in the loop's (and for a supervised run, the supervisor's) own words."""
        parts = []
        ended = self.ended
        if ended and ended.get("message"):
            parts.append(ended["message"])
        elif self.status == "disk_full":
            parts.append("the disk filled up while writing a checkpoint or the final adapter")
        elif self.status == "running":
            parts.append("no end was recorded: the process was killed (SIGKILL, the OOM killer, a power loss) "
                         "or is still running")
        life = self.final_life
        if life is not None and life.get("message"):
            parts.append(f"supervisor: {life['message']}")
        return "; ".join(parts) or STATUS_TEXT.get(self.status, self.status)

    @property
    def resume_command(self) -> str | None:
        ended = self.ended
        if ended and ended.get("resume_command"):
            return ended["resume_command"]
        if self.status not in ("done", "reload") and self.checkpoints:
            return f"memfit train --resume {self.checkpoints[-1].path}"
        return None

    # --- numbers -----------------------------------------------------------------------------------------------

    @property
    def limit_bytes(self) -> int | None:
        limit = self.run.get("limit") or {}
        if limit.get("bytes"):
            return int(limit["bytes"])
        started = self._last_event("RunStarted")
        return int(started["limit_bytes"]) if started and started.get("limit_bytes") else None

    @property
    def threshold(self) -> float | None:
        value = self.config.get("memory_threshold")
        return float(value) if value is not None else None

    @property
    def estimate_bytes(self) -> int | None:
        value = self.run.get("estimate_bytes")
        if value is None:
            started = self._last_event("RunStarted")
            value = started.get("estimate_bytes") if started else None
        return int(value) if value else None

    @property
    def peak_bytes(self) -> int | None:
        """The highest number the guard watched: run.json's peak (it sees between steps too) or the steps'."""
        peaks = [int(self.run["peak_watched_bytes"])] if self.run.get("peak_watched_bytes") else []
        peaks += [int(step["watched_bytes"]) for step in self.steps if step.get("watched_bytes")]
        return max(peaks) if peaks else None

    @property
    def final_loss(self) -> float | None:
        return _number(self.steps[-1].get("loss")) if self.steps else None

    @property
    def final_avg_loss(self) -> float | None:
        return _number(self.steps[-1].get("avg_loss")) if self.steps else None

    @property
    def evals(self) -> list[dict[str, Any]]:
        return [event for event in self.events if event.get("event") == "EvalEnd"]

    @property
    def final_val_loss(self) -> float | None:
        evals = self.evals
        return _number(evals[-1].get("val_loss")) if evals else None

    @property
    def median_tokens_per_s(self) -> float | None:
        # The first step of each process pays for warm-up; the median is not moved by it.
        rates = [step["tokens_per_s"] for step in self.steps if _number(step.get("tokens_per_s"))]
        return statistics.median(rates) if rates else None

    @property
    def total_steps(self) -> int | None:
        value = self.run.get("total_steps") or (self.steps[-1].get("total_steps") if self.steps else None)
        return int(value) if value else None

    @property
    def last_step(self) -> int:
        if self.run.get("step") is not None:
            return int(self.run["step"])
        return int(self.steps[-1]["step"]) if self.steps else 0

    @property
    def oom_recoveries(self) -> int:
        return sum(1 for event in self.events if event.get("event") == "OomRecovered")

    @property
    def lives(self) -> list[dict[str, Any]]:
        return [record for record in self.supervisor if record.get("event") == "ChildEnded"]

    @property
    def model(self) -> str:
        return str(self.run.get("model") or self.config.get("model") or "unknown model")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and value == value else None


def _supervised_exit_code(life: dict[str, Any]) -> int | None:
    from memfit.errors import EXIT_INTERRUPTED, EXIT_OOM

    code = life.get("exit_code")
    if not isinstance(code, int):
        return None
    if code >= 0:
        return code
    return EXIT_OOM if life.get("outcome") == "killed" else (EXIT_INTERRUPTED if life.get("outcome") == "interrupted"
                                                              else 1)


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in (RUN_JSON, METRICS, EVENTS))


def read_run_dir(path: Path) -> RunData:
    """Everything the report shows about the run in `path` (a UserError when it is no run dir at all)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist", hint="pass a run directory (memfit train --output-dir) or a "
                                                       "probe profile JSON")
    if not is_run_dir(path):
        raise UserError(f"{path} is not a memfit run directory (no {RUN_JSON}, {METRICS} or {EVENTS})",
                        hint="pass the --output-dir of a memfit train run, or a probe profile JSON")
    problems: list[str] = []
    run: dict[str, Any] = {}
    try:
        loaded = json.loads((path / RUN_JSON).read_text())
        run = loaded if isinstance(loaded, dict) else {}
    except OSError:
        problems.append(f"no {RUN_JSON}: the run stopped before it was written")
    except ValueError:
        problems.append(f"{RUN_JSON} is not valid JSON")
    config = dict(run.get("config") or {})
    if not config:
        try:
            loaded = yaml.safe_load((path / CONFIG_YAML).read_text())
            config = loaded if isinstance(loaded, dict) else {}
        except (OSError, yaml.YAMLError):
            problems.append(f"no readable config ({RUN_JSON} or {CONFIG_YAML})")

    metrics, bad_metrics = read_jsonl(path / METRICS)
    by_step: dict[int, dict[str, Any]] = {}
    for record in metrics:
        if isinstance(record.get("step"), int):
            by_step[record["step"]] = record  # the last line of a step wins (a life killed after it, redone)
    steps = [by_step[step] for step in sorted(by_step)]
    if not steps:
        problems.append(f"no training steps in {METRICS}")
    events, bad_events = read_jsonl(path / EVENTS)
    supervisor, bad_supervisor = read_jsonl(path / SUPERVISOR_LOG)
    for name, bad in ((METRICS, bad_metrics), (EVENTS, bad_events), (SUPERVISOR_LOG, bad_supervisor)):
        if bad:
            problems.append(f"{bad} unreadable line(s) in {name} skipped (cut by a kill?)")

    saved = {event.get("step"): event for event in events if event.get("event") == "CheckpointSaved"}
    checkpoints = []
    for checkpoint_path in list_checkpoints(path):
        step = int(checkpoint_path.name[5:])
        meta = load_checkpoint_meta(checkpoint_path)
        event = saved.get(step, {})
        checkpoints.append(CheckpointInfo(step, checkpoint_path, (meta or {}).get("reason") or event.get("reason"),
                                          meta is not None, event.get("seconds")))
    if (path / FINAL).is_dir():
        run.setdefault("final_dir", str(path / FINAL))
    return RunData(path, run, config, steps, events, supervisor, checkpoints, problems)
