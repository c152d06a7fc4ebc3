"""What a probe reports while it runs; the CLI renders these (memfit.render.ProbeRenderer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from memfit.events import Event


@dataclass
class ProbeStarted(Event):
    model: str
    device: str
    limit_bytes: int
    limit_auto: bool
    margin: float
    steps: int
    search: list[str]
    journal: str
    reused_trials: int  # finished trials found in the journal (not run again)


@dataclass
class TrialStarted(Event):
    number: int
    settings: dict[str, int]
    estimate_bytes: int | None


@dataclass
class TrialStep(Event):
    number: int
    step: int
    steps: int
    loss: float
    watched_bytes: int


@dataclass
class TrialEnded(Event):
    number: int
    trial: dict[str, Any]  # memfit.probe.trial.Trial.to_dict()
    usable: bool
    from_journal: bool


@dataclass
class ProbeEnded(Event):
    status: str  # found | nothing_fits
    exit_code: int
    chosen: dict[str, Any] | None
    frontier: list[dict[str, Any]] = field(default_factory=list)
    trials: list[dict[str, Any]] = field(default_factory=list)
    profile_path: str | None = None
    entry_key: str | None = None  # the entry of the profile file this probe wrote
    calibration: dict[str, Any] | None = None
    message: str = ""
