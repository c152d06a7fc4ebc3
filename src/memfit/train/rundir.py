"""The run directory: `run.json`, `config.yaml`, `metrics.jsonl` (one line per step), `events.jsonl` (everything
else the loop reported), `checkpoints/`, `final/`. All writes are either appends of whole lines or atomic
replacements, so a killed run never leaves a half-written file behind."""

from __future__ import annotations

import json
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

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
