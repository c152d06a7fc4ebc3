"""Terminal rendering of training events (the loop itself never prints).

On a terminal: a rich progress bar `step/total`, loss (running average), lr, steps/s, tokens/s, ETA and `mem`
(the number the guard watches). Elsewhere (CI logs, pipes): one plain line every ~5% of the run, so logs stay short.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from memfit.train.events import (CheckpointSaved, EvalEnd, Event, GuardNotice, MemoryReport, Notice, OomRecovered,
                                 RunEnded, RunStarted, StepEnd)

GB = 1024**3


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def step_line(event: StepEnd) -> str:
    line = (f"loss: {event.loss:.4f} (avg: {event.avg_loss:.4f}) | lr: {event.lr:.2e} | {event.steps_per_s:.2f} steps/s"
            f" | {event.tokens_per_s:,.0f} tok/s | ETA: {_eta(event.eta_s)} | mem: {event.watched_bytes / GB:.2f} GB")
    if event.distrust_term is not None:
        line += f" | distrust: {event.distrust_term:.3f}"
    return line


class TrainRenderer:
    def __init__(self, console: Console):
        self.console = console
        self.progress: Progress | None = None
        self.task = None
        self.plain_every = 1
        self.first_loss: float | None = None
        self.last_avg_loss: float | None = None

    def __call__(self, event: Event) -> None:
        handler = getattr(self, f"_on_{type(event).__name__}", None)
        if handler:
            handler(event)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def _print(self, text: str, style: str | None = None) -> None:
        # Printed through the live progress when there is one, so the bar stays at the bottom.
        # soft_wrap: log lines stay whole in files and CI logs instead of breaking at 80 columns.
        (self.progress.console if self.progress else self.console).print(text, style=style, highlight=False,
                                                                          soft_wrap=True)

    def _on_Notice(self, event: Notice) -> None:
        self._print(event.message, "yellow" if event.level == "warning" else None)

    def _on_RunStarted(self, event: RunStarted) -> None:
        estimate = f", estimated peak {event.estimate_bytes / GB:.2f} GB" if event.estimate_bytes else ""
        self._print(f"training {event.model} on {event.device} ({event.precision}): "
                    f"{event.trainable_params:,} trainable of {event.total_params:,} params{estimate}; "
                    f"run dir {event.run_dir}")
        self.plain_every = max(1, event.total_steps // 20)
        if self.console.is_terminal:
            self.progress = Progress(TimeElapsedColumn(), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.description}"), console=self.console, transient=False)
            self.progress.start()
            self.task = self.progress.add_task("", total=event.total_steps, completed=event.start_step)

    def _on_StepEnd(self, event: StepEnd) -> None:
        if self.first_loss is None:
            self.first_loss = event.loss
        self.last_avg_loss = event.avg_loss
        if self.progress is not None:
            self.progress.update(self.task, completed=event.step, description=step_line(event))
        elif event.step % self.plain_every == 0 or event.step == event.total_steps or event.step == 1:
            self._print(f"step {event.step}/{event.total_steps} {step_line(event)}")

    def _on_EvalEnd(self, event: EvalEnd) -> None:
        self._print(f"step {event.step}: val loss {event.val_loss:.4f} (perplexity {event.val_perplexity:.2f}, "
                    f"{event.val_tokens:,} tokens)")

    def _on_GuardNotice(self, event: GuardNotice) -> None:
        self._print(f"guard: {event.message}", "red" if event.kind in ("limit", "early_stop") else "yellow")

    def _on_MemoryReport(self, event: MemoryReport) -> None:
        self._print(event.text)

    def _on_OomRecovered(self, event: OomRecovered) -> None:
        self._print(f"recovered: {event.message}", "yellow")

    def _on_CheckpointSaved(self, event: CheckpointSaved) -> None:
        self._print(f"checkpoint: {event.path} ({event.reason}, {event.seconds:.1f} s)", "dim")

    def _on_RunEnded(self, event: RunEnded) -> None:
        self.close()
        style = "green" if event.exit_code == 0 else "red"
        self._print(event.report)
        if self.first_loss is not None and self.last_avg_loss is not None:
            self._print(f"loss: {self.first_loss:.4f} at the first step -> {self.last_avg_loss:.4f} "
                        f"(average of the last steps)")
        self._print(event.message, style)
        if event.oom_recoveries:
            self._print(f"out-of-memory recoveries: {event.oom_recoveries}")
        if event.checkpoint:
            self._print(f"last checkpoint: {event.checkpoint}")
        if event.final_dir:
            self._print(f"adapter/model and tokenizer: {event.final_dir}")
        if event.resume_command:
            self._print(f"resume with: {event.resume_command}", "bold")
        if event.status in ("guard_stop", "oom"):
            self._print("to fit, add a higher --max-memory, or --batch-size B --grad-accum A with the same B x A "
                        "(the effective batch, which keeps the resume exact); `memfit estimate` shows what else saves "
                        "memory")
