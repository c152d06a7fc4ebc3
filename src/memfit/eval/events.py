"""What `memfit eval` reports while it runs (rendered by memfit.eval.render; the library never prints)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from memfit.events import Event


@dataclass
class EvalStarted(Event):
    model: str
    adapter: str | None
    device: str
    precision: str
    mode: str  # loss | generate | code
    samples: int
    limit_bytes: int
    sandboxed: bool | None = None  # code tasks only


@dataclass
class EvalProgress(Event):
    phase: str  # loss | generate
    done: int  # batches
    total: int
    tokens: int = 0


@dataclass
class TaskRun(Event):
    """One code task's generated program, run in the sandbox."""
    index: int  # 1-based
    total: int
    task_id: str
    status: str  # passed | failed | timeout | memory | killed | error
    reason: str
    wall_s: float


@dataclass
class EvalEnded(Event):
    status: str  # done | guard_stop | oom
    exit_code: int
    message: str
    summary: dict[str, Any] = field(default_factory=dict)  # what --json prints
