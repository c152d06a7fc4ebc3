"""Terminal rendering of `memfit eval` events: a line at the start, progress (a bar on a terminal, a line every
~10% elsewhere), one line per code task, and the result."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from memfit.eval.events import EvalEnded, EvalProgress, EvalStarted, TaskRun
from memfit.render import ProgressRenderer
from memfit.events import GuardNotice

from memfit.units import format_gb
_STYLES = {"passed": "green", "failed": "red", "error": "red", "timeout": "yellow", "memory": "yellow",
           "killed": "yellow"}


class EvalRenderer(ProgressRenderer):
    def _on_EvalStarted(self, event: EvalStarted) -> None:
        adapter = f" + adapter {event.adapter}" if event.adapter else ""
        what = {"loss": "loss and perplexity", "generate": "completions", "code": "code tasks (pass@1)"}[event.mode]
        sandbox = {True: ", generated code sandboxed", False: ", generated code NOT sandboxed (--allow-unsandboxed)",
                   None: ""}[event.sandboxed]
        self._print(f"evaluating {event.model}{adapter} on {event.device} ({event.precision}): {what} of "
                    f"{event.samples:,} samples{sandbox}")

    def _on_EvalProgress(self, event: EvalProgress) -> None:
        if self.console.is_terminal:
            if self.progress is None:
                self.progress = Progress(TimeElapsedColumn(), BarColumn(), MofNCompleteColumn(),
                                         TextColumn("{task.description}"), console=self.console)
                self.progress.start()
                self.task = self.progress.add_task(event.phase, total=event.total)
            self.progress.update(self.task, completed=event.done, total=event.total,
                                 description=f"{event.phase}" + (f" {event.tokens:,} tokens" if event.tokens else ""))
            if event.done == event.total:
                self.close()
        elif event.done == event.total or event.done % max(1, event.total // 10) == 0:
            self._print(f"{event.phase}: batch {event.done}/{event.total}"
                        + (f", {event.tokens:,} tokens" if event.tokens else ""), "dim")

    def _on_TaskRun(self, event: TaskRun) -> None:
        self._print(f"task {event.index}/{event.total} {event.task_id}: {event.status} ({event.reason}, "
                    f"{event.wall_s:.2f} s)", _STYLES.get(event.status))

    def _on_GuardNotice(self, event: GuardNotice) -> None:
        self._print(f"guard: {event.message}", "red" if event.kind in ("limit", "early_stop") else "yellow")

    def _on_EvalEnded(self, event: EvalEnded) -> None:
        self.close()
        summary = event.summary
        peak = summary.get("peak_watched_bytes")
        if peak:
            self._print(f"peak memory {format_gb(peak)} of the {format_gb(summary['limit_bytes'])} limit", "dim")
        if summary.get("out"):
            self._print(f"per-sample results: {summary['out']}")
        self._print(event.message, "green" if event.exit_code == 0 else "red")
