"""The run directory: `run.json`, `config.yaml`, `metrics.jsonl` (one line per step), `events.jsonl` (everything
else the loop reported), `checkpoints/`, `final/`. All writes are either appends of whole lines or atomic
replacements, so a killed run never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import yaml

from memfit.errors import UserError
from memfit.files import write_atomic
from memfit.train.checkpoint import CHECKPOINTS
from memfit.events import Event, StepEnd

RUN_JSON = "run.json"
CONFIG_YAML = "config.yaml"
METRICS = "metrics.jsonl"
EVENTS = "events.jsonl"
SUPERVISOR_LOG = "supervisor.jsonl"  # memfit.train.supervisor's restarts, one JSON line each
FINAL = "final"


def write_final(run_dir: Path, write: Callable[[Path], None]) -> Path:
    """`final/`, whole or not at all: `write(directory)` fills a partial directory beside it, which then takes its
    place (an earlier final/, from a run resumed after it was written, is moved aside and removed). An error in
    `write` removes the partial directory and propagates."""
    final = run_dir / FINAL
    partial = run_dir / f".{FINAL}.tmp-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        write(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if final.exists():
        old = run_dir / f".{FINAL}.old-{os.getpid()}"
        os.rename(final, old)
        os.rename(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(partial, final)
    return final


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("memfit", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def check_fresh_output_dir(run_dir: Path) -> None:
    """A new run never writes over an earlier one's checkpoints or metrics."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--output-dir {run_dir} is a file", hint="choose a directory path")
    held = [name for name in (RUN_JSON, METRICS, CHECKPOINTS, FINAL) if (run_dir / name).exists()]
    if held:
        raise UserError(f"--output-dir {run_dir} already holds a run ({', '.join(held)})",
                        hint=f"continue it with --resume --output-dir {run_dir}, or choose a new --output-dir")


class RunDir:
    """Writes the run directory's files; also an event sink (`__call__`) for the loop."""

    def __init__(self, path: Path, step_fields: dict[str, Any] | None = None):
        self.path = path
        self.step_fields = step_fields or {}  # added to every metrics line (a supervised run's attempt number)
        path.mkdir(parents=True, exist_ok=True)

    def write_run_json(self, data: dict[str, Any]) -> None:
        write_atomic(self.path / RUN_JSON, json.dumps(data, indent=2, default=str) + "\n")

    def update_run_json(self, status: dict[str, Any], peak_watched_bytes: int, oom_recoveries: int,
                        started: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """run.json with `status` merged in; `started()` gives the run's description when the file has none yet
        (the first write of a run, not of a resumed one). A resumed run's peaks are the highest of its processes'.
        Returns what was written."""
        data = self.read_run_json()
        if "config" not in data:
            data.update(started())
        if "peak_rss_bytes" in status:
            status = {**status, "peak_rss_bytes": max(data.get("peak_rss_bytes") or 0, status["peak_rss_bytes"])}
        data.update(status)
        data["peak_watched_bytes"] = max(data.get("peak_watched_bytes") or 0, peak_watched_bytes)
        data["oom_recoveries"] = oom_recoveries
        self.write_run_json(data)
        return data

    def read_run_json(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / RUN_JSON).read_text())
        except (OSError, ValueError):
            return {}

    def write_config(self, values: dict[str, Any]) -> Path:
        """The resolved config as YAML with the flags' keys: `memfit train -c` reads it back."""
        path = self.path / CONFIG_YAML
        write_atomic(path, yaml.safe_dump(values, sort_keys=False))
        return path

    def truncate_metrics_after(self, step: int) -> None:
        """On resume: drop the lines of steps after the checkpoint (they are trained again)."""
        for name in (METRICS, EVENTS):
            path = self.path / name
            if not path.exists():
                continue
            kept = []
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill
                if record.get("step", 0) <= step:
                    kept.append(line)
            write_atomic(path, "".join(line + "\n" for line in kept))

    def _append(self, name: str, record: dict[str, Any]) -> None:
        with open(self.path / name, "a") as file:
            file.write(json.dumps(record, default=str) + "\n")

    def __call__(self, event: Event) -> None:
        record = event.to_dict()
        record["time"] = time.time()
        if isinstance(event, StepEnd):
            memory = record.pop("memory")
            record.pop("event")
            self._append(METRICS, {**record, **memory, **self.step_fields})
        else:
            self._append(EVENTS, record)
