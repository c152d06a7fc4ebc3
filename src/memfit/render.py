"""Terminal rendering of training and probe events (the loop and the probe never print); the read commands'
tables are memfit.views.

On a terminal: a rich progress bar `step/total`, loss (running average), lr, steps/s, tokens/s, ETA and `mem`
(the number the guard watches). Elsewhere (CI logs, pipes): one plain line every ~5% of the run, so logs stay short.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from memfit.events import (CheckpointSaved, ChildEnded, ChildStarted, EvalEnd, Event, GuardNotice, MemoryReport, Notice,
                           OomRecovered, RunEnded, RunStarted, StepEnd)
from memfit.units import format_gb



def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def step_line(event: StepEnd) -> str:
    line = (f"loss: {event.loss:.4f} (avg: {event.avg_loss:.4f}) | lr: {event.lr:.2e} | {event.steps_per_s:.2f} steps/s"
            f" | {event.tokens_per_s:,.0f} tok/s | ETA: {_eta(event.eta_s)} | mem: {format_gb(event.watched_bytes)}")
    if event.distrust_term is not None:
        line += f" | distrust: {event.distrust_term:.3f}"
    return line


class EventRenderer:
    """Calls `_on_<EventClassName>` for each event it is given; events without a handler are not shown."""

    def __init__(self, console: Console):
        self.console = console

    def __call__(self, event: Event) -> None:
        handler = getattr(self, f"_on_{type(event).__name__}", None)
        if handler:
            handler(event)

    def _print(self, text: str, style: str | None = None) -> None:
        # soft_wrap: log lines stay whole in files and CI logs instead of breaking at 80 columns.
        self._output().print(text, style=style, highlight=False, soft_wrap=True)

    def _output(self) -> Console:
        return self.console

    def _on_Notice(self, event: Notice) -> None:
        self._print(event.message, "yellow" if event.level == "warning" else None)


class ProgressRenderer(EventRenderer):
    """A renderer with a live progress bar on a terminal (plain lines elsewhere)."""

    def __init__(self, console: Console):
        super().__init__(console)
        self.progress: Progress | None = None
        self.task = None

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def _output(self) -> Console:
        # Through the live progress when there is one, so the bar stays at the bottom.
        return self.progress.console if self.progress else self.console


class TrainRenderer(ProgressRenderer):
    """`memfit train`: the run's progress, lines and end; under --supervise, the supervisor's lines."""

    def __init__(self, console: Console):
        super().__init__(console)
        self.plain_every = 1
        self.first_loss: float | None = None
        self.last_avg_loss: float | None = None

    def _on_RunStarted(self, event: RunStarted) -> None:
        estimate = f", estimated peak {format_gb(event.estimate_bytes)}" if event.estimate_bytes else ""
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
        if event.status == "guard_stop" and event.stop_limit in ("host", "host_available"):
            self._print("host RAM, not the GPU's, ran short: close what else uses the machine's RAM, or give a higher "
                        "--max-host-memory; loading and saving hold the weights on the host (`memfit estimate` "
                        "shows their host peak)")
        elif event.status == "oom" or (event.status == "guard_stop" and event.resume_command
                                     and event.resume_command.endswith(str(event.checkpoint))):
            self._print("to fit, add a higher --max-memory, or --batch-size B --grad-accum A with the same B x A "
                        "(the effective batch, which keeps the resume exact); `memfit estimate` shows what else saves "
                        "memory")

    # `memfit train --supervise`: the parent's lines, as each life of the trainer's child process starts and ends
    # (the child renders its own training output to the same terminal).

    def _on_ChildStarted(self, event: ChildStarted) -> None:
        adj = f", oom_score_adj {event.oom_score_adj}" if event.oom_score_adj is not None else ""
        self._print(f"supervisor: trainer process {event.pid} (life {event.attempt + 1}{adj})", "dim")

    def _on_ChildEnded(self, event: ChildEnded) -> None:
        style = {"exit": "green" if event.exit_code == 0 else "red", "give_up": "red", "reload": "dim"}
        self._print(f"supervisor: {event.message}", style.get(event.action, "yellow"))


# --- memfit probe --------------------------------------------------------------------------------------------------


def _settings(settings: dict) -> str:
    return " ".join(f"{key.replace('_size', '').replace('lora_', '')}={value}" for key, value in settings.items())


class ProbeRenderer(EventRenderer):
    """A line as each trial starts and ends (with a live step counter on a terminal), then the table of all
    trials and the chosen settings, in the seed's words."""

    def __init__(self, console: Console, searched: list[str]):
        super().__init__(console)
        self.searched = searched  # the config fields the probe chooses (batch_size first)
        self.status = None
        self.limit_bytes = 0
        self.margin = 0.0

    def close(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None

    def _shown(self, settings: dict) -> dict:
        return {key: settings[key] for key in self.searched}

    def _on_ProbeStarted(self, event) -> None:
        self.limit_bytes, self.margin = event.limit_bytes, event.margin
        how = "auto: 80% of available" if event.limit_auto else "--max-memory"
        self._print(f"probing {event.model} on {event.device}: limit {format_gb(event.limit_bytes)} ({how}), "
                    f"margin {event.margin:.0%}, {event.steps} steps per trial, search {','.join(event.search)}")
        self._print(f"journal: {event.journal}"
                    + (f" ({event.reused_trials} finished trial(s) from an earlier run, not rerun)"
                       if event.reused_trials else ""), "dim")

    def _on_TrialStarted(self, event) -> None:
        estimate = f" (estimated {format_gb(event.estimate_bytes)})" if event.estimate_bytes else ""
        self._print(f"trial {event.number}: {_settings(self._shown(event.settings))}{estimate} ...")
        if self.console.is_terminal:
            self.status = self.console.status(f"trial {event.number}: loading")
            self.status.start()

    def _on_TrialStep(self, event) -> None:
        if self.status is not None:
            self.status.update(f"trial {event.number}: step {event.step}/{event.steps}, loss {event.loss:.3f}, "
                               f"mem {format_gb(event.watched_bytes)}")

    def _on_TrialEnded(self, event) -> None:
        self.close()
        trial = event.trial
        peak = f"peak {format_gb(trial['peak_bytes'])}" if trial["peak_bytes"] else "peak unknown"
        adjusted = f" (x{1 + self.margin:.2f}: {format_gb(trial['peak_bytes'] * (1 + self.margin))})" \
            if trial["peak_bytes"] else ""
        speed = f", {trial['tokens_per_s']:,.0f} tok/s" if trial.get("tokens_per_s") else ""
        verdict = "usable" if event.usable else {"fits": "fits, not usable", "over_limit": "over the limit",
                                                 "oom": "OOM", "error": "error"}[trial["status"]]
        style = "green" if event.usable else ("yellow" if trial["status"] == "fits" else "red")
        source = " [journal]" if event.from_journal else ""
        self._print(f"trial {event.number}: {_settings(self._shown(trial['settings']))} -> {verdict}: {peak}"
                    f"{adjusted}{speed}; {trial['detail']}{source}", style)

    def _on_ProbeEnded(self, event) -> None:
        from rich.table import Table

        self.close()
        table = Table(title=f"probe trials (limit {format_gb(self.limit_bytes)}, margin {self.margin:.0%})")
        for column in ("#", *[c.replace("_size", "").replace("lora_", "") for c in self.searched], "result", "peak",
                       "+margin", "estimate", "step", "tok/s", "growth", "detail"):
            table.add_column(column, justify="right" if column not in ("result", "detail") else "left")
        for number, trial in enumerate(event.trials, 1):
            peak = trial["peak_bytes"]
            result = "usable" if trial["usable"] else trial["status"].replace("_", " ")
            table.add_row(str(number), *[str(trial["settings"][key]) for key in self.searched],
                          f"[{'green' if trial['usable'] else 'red'}]{result}[/]",
                          format_gb(peak) if peak else "-",
                          format_gb(peak * (1 + self.margin)) if peak else "-",
                          format_gb(trial['estimate_bytes']) if trial.get("estimate_bytes") else "-",
                          f"{trial['step_time_s']:.2f} s" if trial.get("step_time_s") else "-",
                          f"{trial['tokens_per_s']:,.0f}" if trial.get("tokens_per_s") else "-",
                          f"{trial['growth']:+.1%}" if trial.get("growth") is not None else "-",
                          trial["detail"] + (" [journal]" if trial.get("from_journal") else ""))
        # Off a terminal (logs, pipes) rich would squeeze the table into 80 columns.
        wide = self.console if self.console.is_terminal else Console(file=self.console.file, width=160)
        wide.print(table)
        if len(event.frontier) > 1:
            self._print("largest batch per value: " + ", ".join(
                f"{_settings({k: v for k, v in point.items() if k != 'max_batch'})}: {point['max_batch']}"
                for point in event.frontier))
        if event.calibration:
            cal = event.calibration
            self._print(f"estimator calibration: measured/estimated = {cal['ratio']:.3f} over {cal['trials']} "
                        f"trial(s) (range {cal['min']:.3f}-{cal['max']:.3f})")
        if event.chosen:
            chosen = event.chosen
            self._print("OPTIMAL CONFIGURATION:", "bold green")
            for key in self.searched:
                self._print(f"  {key.replace('_', ' ')}: {chosen[key]}")
            self._print(f"  peak memory: {format_gb(chosen['peak_bytes'])} "
                        f"({format_gb(chosen['peak_x_margin_bytes'])} with the {self.margin:.0%} margin)")
            if chosen.get("step_time_s"):
                self._print(f"  step time: {chosen['step_time_s']:.2f} s ({chosen['tokens_per_s']:,.0f} tok/s)")
            self._print(f"profile saved: {event.profile_path}")
            self._print("train with it: memfit train --profile auto ... (explicit flags override it)", "bold")
        else:
            self._print(event.message, "red")
            self._print("to fit: --method qlora, --grad-checkpointing, a shorter --seq-len, or a higher --max-memory "
                        "(`memfit estimate` shows what each saves)")
