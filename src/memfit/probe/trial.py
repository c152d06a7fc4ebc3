"""One probe trial: real training steps in a child process, watched and classified by the parent.

The child is `memfit train` itself (memfit.train.Trainer, with `TrainJob.trial`, rendered as the CLI renders): the
same model loading, data tokenized as training does, the run's own first batches (the longest row in the last),
the same loss and optimizer, the guard on with the probe's limit. It writes the run
directory's `metrics.jsonl` line by line, so the parent knows each step's memory even if the child dies.

The parent never loads the model. It samples the child's resident set, kills it when it runs past the limit or
stops making progress, and turns however the child ended into one of four statuses:

- fits        all steps ran (whether the setting is *usable* also needs the margin and a stable peak);
- over_limit  the child's guard stopped it at the limit (exit 3), or the parent killed it past the limit;
- oom         an out-of-memory error (exit 4), or SIGKILL from outside: the kernel's OOM killer;
- error       anything else: bad input (exit 2, the child's one-line message), an exception, a crash, a hang.
              An error with an exit code (bad input, an exception) stops the probe: it is not a memory outcome,
              and reading it as "does not fit" is the classic OOM false positive.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from memfit.errors import EXIT_GUARD_STOP, EXIT_OOM, EXIT_USAGE
from memfit.units import format_gb

STATUSES = ("fits", "over_limit", "oom", "error")
# The parent kills a child whose resident set passes the limit by this much: the child's guard only stops at a
# step boundary, and one long micro-batch must not take the machine down meanwhile.
KILL_OVER_LIMIT = 1.10
_POLL_S = 0.05
GROWTH_MIN_STEPS = 10
CHILD_ERROR = "error.json"  # in the trial dir: the kind of a MemfitError that ended the child (child_error)


@dataclass
class TrialSpec:
    """What one trial trains: the full TrainConfig values (batch size and the searched axes included)."""

    model: str
    data: str
    device: str
    config: dict[str, Any]
    limit_bytes: int
    engine: str = "torch"  # mlx: the child trains with memfit.mlx


@dataclass
class Trial:
    """A finished trial: the settings tried, how it ended, and what it measured."""

    settings: dict[str, int]  # batch_size, and lora_rank or seq_len when those are searched
    status: str  # one of STATUSES
    detail: str  # why, in words
    steps: int  # steps asked for
    steps_done: int
    peak_bytes: int | None  # peak RSS on CPU/MPS, max_memory_reserved on CUDA
    peak_source: str  # which number peak_bytes is
    nvml_peak_bytes: int | None = None  # device memory used by all processes at the child's peak (NVML)
    step_time_s: float | None = None  # median step time, the first (warm-up) step left out
    tokens_per_s: float | None = None  # real (non-pad) tokens
    growth: float | None = None  # relative rise of step-end memory from step 2/3·steps (10 of 15) to the last
    exit_code: int | None = None
    wall_s: float = 0.0
    estimate_bytes: int | None = None  # the estimator's prediction for these settings (filled by the parent)
    notes: list[str] = field(default_factory=list)

    def unstable(self, max_growth: float = 0.10) -> bool:
        return self.growth is not None and self.growth > max_growth

    def usable(self, limit_bytes: int, margin: float, max_growth: float = 0.10) -> bool:
        """Fits with room to spare: every step ran, peak x (1 + margin) under the limit, no growth."""
        return (self.status == "fits" and self.steps_done >= self.steps and self.peak_bytes is not None
                and self.peak_bytes * (1 + margin) <= limit_bytes and not self.unstable(max_growth))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Trial":
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line cut short by a kill
            break
    return records


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def growth_between(step_end_bytes: list[int], steps: int) -> float | None:
    """Relative rise of step-end memory from step round(2/3·steps) to the last (steps 10 and 15 of 15). None below
    GROWTH_MIN_STEPS: the first steps still settle (optimizer states, allocator pools; on CPU the step-end RSS of
    the tiny model rises 15% between steps 3 and 4), which no short window can tell from a leak."""
    if steps < GROWTH_MIN_STEPS or len(step_end_bytes) < steps:
        return None
    reference = step_end_bytes[max(1, round(2 * steps / 3)) - 1]
    return (step_end_bytes[steps - 1] - reference) / reference if reference else None


def _child_rss_bytes(process) -> int:
    """Resident set of the child and anything it started (tokenizer or loader workers)."""
    try:
        total = process.memory_info().rss
        for child in process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except Exception:  # noqa: BLE001 - a grandchild that just exited
                pass
        return int(total)
    except Exception:  # noqa: BLE001 - the child itself just exited
        return 0


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].removeprefix("memfit: error: ") if lines else ""


def run_trial(spec: TrialSpec, trial_dir: Path, *, steps: int, timeout_s: float,
              env: dict[str, str] | None = None, on_step: Callable[[dict[str, Any]], None] | None = None,
              check_interrupted: Callable[[], None] | None = None) -> Trial:
    """Run one trial in a child process and classify how it ended. `timeout_s` is the longest the child may go
    without finishing a step (model loading included) before it counts as hung. `check_interrupted` is called
    while waiting; what it raises (KeyboardInterrupt) kills the child and propagates."""
    import psutil

    trial_dir.mkdir(parents=True, exist_ok=True)
    run_dir = trial_dir / "run"
    spec_path = trial_dir / "spec.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    stderr_path = trial_dir / "stderr.txt"
    metrics_path = run_dir / "metrics.jsonl"
    command = [sys.executable, "-m", "memfit.child", "trial", str(spec_path), str(run_dir)]
    started = time.monotonic()
    killed_for: str | None = None
    sampled_peak = 0
    with open(stderr_path, "w") as stderr:
        # A session of its own: the user's Ctrl-C reaches the parent only, which then ends the child itself.
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                 start_new_session=True, env={**os.environ, **(env or {})})
        try:
            watched = psutil.Process(child.pid)
            last_progress, seen_lines = time.monotonic(), 0
            while child.poll() is None:
                if check_interrupted:
                    check_interrupted()
                rss = _child_rss_bytes(watched)
                sampled_peak = max(sampled_peak, rss)
                if spec.device == "cpu" and rss > spec.limit_bytes * KILL_OVER_LIMIT:
                    killed_for = f"killed by the probe at {format_gb(rss)}, past the limit"
                elif time.monotonic() - last_progress > timeout_s:
                    killed_for = f"no progress for {timeout_s:.0f} s (hung); killed"
                if killed_for:
                    _kill(child)
                    break
                lines = _read_jsonl(metrics_path) if metrics_path.exists() else []
                if len(lines) > seen_lines:
                    for line in lines[seen_lines:]:
                        if on_step:
                            on_step(line)
                    seen_lines, last_progress = len(lines), time.monotonic()
                time.sleep(_POLL_S)
        except BaseException:  # Ctrl-C in the parent, or any bug here: never leave a training child behind
            _kill(child)
            raise
    return _classify(spec, steps, child.returncode, killed_for, sampled_peak, _read_jsonl(metrics_path),
                     _last_line(stderr_path), time.monotonic() - started)


def _kill(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()


def _classify(spec: TrialSpec, steps: int, exit_code: int, killed_for: str | None, sampled_peak: int,
              metrics: list[dict[str, Any]], stderr_line: str, wall_s: float) -> Trial:
    on_cuda = spec.device.startswith("cuda")
    settings = {key: spec.config[key] for key in ("batch_size", "lora_rank", "seq_len")}
    # Growth is judged on what stays after each step (a leak keeps it), not on the step's transient peak, which
    # a 0.1 s sampler catches more or less fully from step to step.
    settled = [int(line.get("cuda_allocated_bytes" if on_cuda else "rss_bytes") or 0) for line in metrics]
    if on_cuda:
        reserved = [line.get("cuda_max_reserved_bytes") for line in metrics if line.get("cuda_max_reserved_bytes")]
        peak, source = (max(reserved), "max_memory_reserved") if reserved else (None, "max_memory_reserved")
    else:
        # MLX (memfit.mlx.memory): what its guard watches, the RSS or MLX's own arrays and cache, whichever is
        # larger (on a Mac MLX's Metal buffers need not show in the RSS).
        recorded = [max(line.get("peak_rss_bytes") or 0,
                        (line.get("mlx_peak_bytes") or 0) + (line.get("mlx_cache_bytes") or 0)) for line in metrics]
        peak = max(recorded + [sampled_peak]) or None
        source = ("peak_rss" if spec.engine == "torch" else "peak_rss or MLX peak") if recorded \
            else "parent-sampled rss"
    nvml = [line["nvml_used_bytes"] for line in metrics if line.get("nvml_used_bytes")]
    times = [line["step_time_s"] for line in metrics[1:]] or [line["step_time_s"] for line in metrics]
    tokens = [line["tokens"] for line in metrics[1:]] or [line["tokens"] for line in metrics]
    trial = Trial(settings=settings, status="error", detail="", steps=steps, steps_done=len(metrics),
                  peak_bytes=peak, peak_source=source, nvml_peak_bytes=max(nvml) if nvml else None,
                  step_time_s=_median(times), tokens_per_s=sum(tokens) / sum(times) if times and sum(times) else None,
                  growth=growth_between(settled, steps), exit_code=exit_code, wall_s=round(wall_s, 2))
    if killed_for and "past the limit" in killed_for:
        trial.status, trial.detail = "over_limit", killed_for
    elif killed_for:
        trial.detail = killed_for
    elif exit_code == 0 and peak is not None and peak > spec.limit_bytes:
        trial.status = "over_limit"
        trial.detail = f"ran {len(metrics)} steps but peaked {format_gb(peak)}, over the limit between readings"
    elif exit_code == 0:
        trial.status, trial.detail = "fits", f"{len(metrics)} steps"
        if trial.unstable():
            trial.detail += f"; unstable: +{trial.growth:.0%} between the late steps"
    elif exit_code == EXIT_GUARD_STOP:
        trial.status, trial.detail = "over_limit", f"the guard stopped it after {len(metrics)} steps"
    elif exit_code == EXIT_OOM:
        trial.status, trial.detail = "oom", stderr_line or "out of memory"
    elif exit_code == -signal.SIGKILL:
        trial.status = "oom"
        trial.detail = "killed by SIGKILL: the kernel's OOM killer (see `dmesg`), or another process"
    elif exit_code < 0:
        trial.detail = f"crashed with {_signal_name(-exit_code)}"
    elif exit_code == EXIT_USAGE:
        trial.detail = stderr_line or "bad input"
    else:
        trial.detail = f"exit {exit_code}: {stderr_line or 'no message'}"
    return trial


def failed_on_input(trial: Trial) -> bool:
    """An error that says nothing about memory (bad input, a bug, a broken model file): every trial would fail
    the same way, so the probe stops instead of reading it as "does not fit"."""
    return trial.status == "error" and trial.exit_code is not None and trial.exit_code > 0


# --- the child ---------------------------------------------------------------------------------------------------


def write_child_error(trial_dir: Path, error: Exception) -> None:
    """The child's side (memfit.child.trial): what the parent needs to tell the kind of an expected failure (the
    stderr line alone does not say)."""
    from memfit.errors import WeightsDamagedError, error_line

    record = {"kind": type(error).__name__, "line": error_line(error),
              "weights_damaged": isinstance(error, WeightsDamagedError)}
    try:
        (trial_dir / CHILD_ERROR).write_text(json.dumps(record) + "\n")
    except OSError:
        pass  # the stderr line still says it


def child_error(trial_dir: Path) -> dict[str, Any] | None:
    """The expected failure a trial's child reported (`write_child_error`), if any."""
    try:
        record = json.loads((trial_dir / CHILD_ERROR).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
