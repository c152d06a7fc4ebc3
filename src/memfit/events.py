"""The events memfit's commands report: the base `Event` and `Notice` every command uses, and what a training run
says (the trainer, a probe trial, the evaluator's guard notices). Nothing that emits them knows the terminal: the
entry points render them (memfit.render) and the run directory's JSONL writer records them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Event:
    def to_dict(self) -> dict[str, Any]:
        data = {"event": type(self).__name__}
        data.update({key: str(value) if isinstance(value, Path) else value for key, value in asdict(self).items()})
        return data


@dataclass
class Notice(Event):
    """A line worth showing: the memory limit chosen, the data summary, a resume, a cleaned-up partial checkpoint."""
    message: str
    level: str = "info"  # info | warning


@dataclass
class RunStarted(Event):
    run_dir: Path
    start_step: int
    total_steps: int
    model: str
    device: str
    precision: str
    trainable_params: int
    total_params: int
    limit_bytes: int
    estimate_bytes: int | None


@dataclass
class StepEnd(Event):
    step: int
    total_steps: int
    loss: float
    avg_loss: float
    ce: float
    lr: float
    grad_norm: float | None
    tokens: int
    step_time_s: float
    tokens_per_s: float
    steps_per_s: float
    eta_s: float
    micro_batch: int
    grad_accum: int
    watched_bytes: int  # the number the guard compares to the limit (peak inside this step)
    memory: dict[str, Any] = field(default_factory=dict)
    distrust_term: float | None = None


@dataclass
class EvalEnd(Event):
    step: int
    val_loss: float
    val_perplexity: float
    val_tokens: int


@dataclass
class GuardNotice(Event):
    kind: str  # threshold | limit | early_stop | leak
    step: int
    watched_bytes: int
    message: str
    limit: str = "device"  # which limit: device (--max-memory), host (--max-host-memory), host_available (floor)


@dataclass
class MemoryReport(Event):
    step: int
    text: str


@dataclass
class OomRecovered(Event):
    step: int
    micro_batch: int  # the new, halved micro-batch
    grad_accum: int  # the new number of micro-batches per step
    recoveries: int
    message: str


@dataclass
class CheckpointSaved(Event):
    step: int
    path: Path
    reason: str
    seconds: float


@dataclass
class RunEnded(Event):
    status: str  # done | guard_stop | oom | interrupted
    exit_code: int
    step: int
    total_steps: int
    message: str
    checkpoint: Path | None = None
    final_dir: Path | None = None
    resume_command: str | None = None
    report: str | None = None
    oom_recoveries: int = 0
    stop_limit: str | None = None  # a guard stop's limit: device, host (--max-host-memory) or host_available


# --- `memfit train --supervise` (memfit.train.supervisor): each life of the trainer's child process ----------------


@dataclass
class ChildStarted(Event):
    attempt: int
    pid: int
    oom_score_adj: int | None  # as read back from /proc (None where there is no such file)
    resume_from: str | None
    max_micro_batch: int | None


@dataclass
class ChildEnded(Event):
    attempt: int
    step: int  # the newest good checkpoint's step after this life (what the next one resumes from)
    exit_code: int  # negative: killed by that signal
    outcome: str  # done | reload | killed | guard_stop | oom | crash | bad_input | interrupted
    action: str  # exit | restart | reload | give_up
    message: str
    micro_batch: int | None  # the next life's micro-batch limit, when there is one
