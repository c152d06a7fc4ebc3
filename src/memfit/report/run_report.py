"""The report of one training run: what it trained, how memory went, how it learned, how it ended."""

from __future__ import annotations

from typing import Any

from memfit.report import plots
from memfit.report.page import (STATUS_TONE, Code, card, document, esc, gb, key_values, section, table)
from memfit.report.rundata import STATUS_TEXT, RunData

STATUS_SHORT = {"done": "done", "guard_stop": "guard stop", "oom": "out of memory", "interrupted": "interrupted",
                "disk_full": "disk full", "reload": "reloading", "running": "no end"}
# The config fields shown first (what decides memory and learning); the rest follow in the table's second half.
MAIN_FIELDS = ("method", "quant", "dtype", "optimizer", "batch_size", "grad_accum", "seq_len", "lora_rank",
               "lora_alpha", "lora_targets", "grad_checkpointing", "lr", "warmup_steps", "max_steps", "epochs",
               "loss", "max_memory", "memory_threshold", "save_every", "supervise")


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _summary_cards(data: RunData) -> str:
    exit_code = data.exit_code
    steps = f"{data.last_step} / {data.total_steps}" if data.total_steps else str(data.last_step)
    limit = data.limit_bytes
    peak = data.peak_bytes
    estimate = data.estimate_bytes
    cards = [
        card("status", STATUS_SHORT.get(data.status, data.status),
             f"exit code {exit_code}" if exit_code is not None else "no exit code recorded"),
        card("steps", steps),
        card("final loss", _fmt(data.final_loss), f"running avg {_fmt(data.final_avg_loss)}"
             if data.final_avg_loss is not None else ""),
    ]
    if data.final_val_loss is not None:
        cards.append(card("validation loss", _fmt(data.final_val_loss), f"at step {data.evals[-1].get('step')}"))
    cards += [
        card("peak memory", gb(peak), f"{peak / limit:.0%} of the limit" if peak and limit else ""),
        card("limit", gb(limit), "auto (80% of available)" if (data.run.get("limit") or {}).get("auto")
             else "--max-memory" if limit else ""),
        card("estimate", gb(estimate), f"measured / estimated {peak / estimate:.2f}" if peak and estimate else ""),
        card("tokens/s", f"{data.median_tokens_per_s:,.0f}" if data.median_tokens_per_s else "–", "median per step"),
    ]
    if data.oom_recoveries:
        cards.append(card("OOM recoveries", str(data.oom_recoveries), "micro-batch halved, same effective batch"))
    if data.lives:
        restarts = sum(1 for life in data.lives if life.get("action") == "restart")
        cards.append(card("lives", str(len(data.lives)), f"{restarts} restart(s) by the supervisor"))
    return f'<div class="cards">{"".join(cards)}</div>'


def _ending(data: RunData) -> str:
    tone = STATUS_TONE.get(data.status, "info")
    rows: list[tuple[str, Any]] = [("status", f"{data.status} ({STATUS_TEXT.get(data.status, data.status)})"),
                                   ("exit code", data.exit_code), ("why", data.stop_message)]
    for event in data.events:
        if event.get("event") == "GuardNotice" and event.get("kind") in ("limit", "early_stop", "leak"):
            rows.append((f"guard ({event.get('kind')}, step {event.get('step')})", event.get("message")))
    resume = data.resume_command
    if resume:
        rows.append(("resume with", Code(resume)))
    if data.run.get("checkpoint"):
        rows.append(("last checkpoint", Code(data.run["checkpoint"])))
    if data.run.get("final_dir"):
        rows.append(("adapter / model", Code(data.run["final_dir"])))
    for key, label in (("started_at", "started"), ("finished_at", "finished")):
        if data.run.get(key):
            rows.append((label, data.run[key]))
    return f'<div class="stop {esc(tone)}">{key_values(rows)}</div>'


def _memory_section(data: RunData) -> str:
    guard_events = [event for event in data.events if event.get("event") == "GuardNotice"]
    ooms = [event for event in data.events if event.get("event") == "OomRecovered"]
    life_starts = []
    previous = None
    for step in data.steps:
        attempt = step.get("attempt")
        if previous is not None and attempt != previous:
            life_starts.append(step["step"])
        previous = attempt
    svg = plots.memory_plot(data.steps, limit_bytes=data.limit_bytes, threshold=data.threshold,
                            estimate_bytes=data.estimate_bytes, guard_events=guard_events, ooms=ooms,
                            checkpoints=[checkpoint.step for checkpoint in data.checkpoints],
                            life_starts=life_starts)
    if svg is None:
        return section("Memory", "<p>No steps were recorded.</p>", "memory")
    device = data.run.get("device", "cpu")
    what = ("GPU memory reserved by the caching allocator" if device.startswith("cuda")
            else "the process's resident set (RSS)")
    note = (f"<p>The guard watches {esc(what)}: the highest value inside each step is the line it compares with "
            "the limit.</p>")
    return section("Memory", svg + note, "memory")


def _events_table(data: RunData) -> str:
    rows, classes = [], []
    for event in data.events:
        kind = event.get("event")
        if kind == "Notice":
            rows.append((event.get("step", ""), "notice", event.get("message")))
            classes.append(f"level-{event.get('level', 'info')}")
        elif kind == "GuardNotice":
            rows.append((event.get("step"), f"guard: {event.get('kind')}", event.get("message")))
            classes.append("level-warning")
        elif kind == "OomRecovered":
            rows.append((event.get("step"), "OOM recovered", event.get("message")))
            classes.append("level-warning")
        elif kind == "EvalEnd":
            rows.append((event.get("step"), "evaluation", f"val loss {event.get('val_loss', 0):.4f}, perplexity "
                                                          f"{event.get('val_perplexity', 0):.2f}"))
            classes.append("")
        elif kind == "ChildEnded":
            rows.append((event.get("step"), f"supervisor: life {event.get('attempt')}", event.get("message")))
            classes.append("level-warning" if event.get("action") == "restart" else "")
        elif kind == "RunEnded":
            rows.append((event.get("step"), f"end: {event.get('status')}", event.get("message")))
            classes.append("")
    if not rows:
        return ""
    return section("Events", table(("step", "what", "message"), rows, row_classes=classes), "events")


def _checkpoints_table(data: RunData) -> str:
    if not data.checkpoints:
        return section("Checkpoints", "<p>No checkpoint on disk.</p>", "checkpoints")
    rows = [(checkpoint.step, checkpoint.reason or "–",
             f"{checkpoint.seconds:.2f} s" if checkpoint.seconds is not None else "–",
             "yes" if checkpoint.complete else "no (unfinished write)", Code(checkpoint.path))
            for checkpoint in data.checkpoints]
    return section("Checkpoints", table(("step", "reason", "write time", "complete", "path"), rows,
                                        numeric=(0, 2)), "checkpoints")


def _lives_table(data: RunData) -> str:
    if not data.lives:
        return ""
    rows = [(life.get("attempt"), life.get("outcome"), life.get("exit_code"), life.get("action"), life.get("step"),
             life.get("micro_batch") or "–", life.get("message")) for life in data.lives]
    return section("Supervisor: lives of the trainer",
                   table(("life", "outcome", "exit", "action", "checkpoint step", "next micro-batch", "message"),
                         rows, numeric=(0, 2, 4)), "lives")


def _config_section(data: RunData) -> str:
    config = data.config
    ordered = [key for key in MAIN_FIELDS if key in config] + [key for key in config if key not in MAIN_FIELDS]
    rows = [(key, config[key]) for key in ordered if key not in ("model", "data", "output_dir")]
    half = (len(rows) + 1) // 2
    job = [("model", Code(data.model)), ("model path", Code(data.run.get("model_path", "–"))),
           ("data", Code(data.run.get("data") or config.get("data") or "–"))]
    if data.run.get("val_data"):
        job.append(("validation data", Code(data.run["val_data"])))
    stats = data.run.get("data_stats") or {}
    if stats:
        job.append(("data", f"{stats.get('records', '?')} records, {stats.get('rows', '?')} rows, "
                            f"{stats.get('tokens', 0):,} tokens" + (", packed" if stats.get("packed") else "")))
    job += [("device", data.run.get("device", "–")), ("precision", data.run.get("precision", "–"))]
    return section("Configuration",
                   key_values(job) + '<div class="grid2" style="margin-top:14px">'
                   f"<div>{key_values(rows[:half])}</div><div>{key_values(rows[half:])}</div></div>", "config")


def _hardware_section(data: RunData) -> str:
    hardware = data.run.get("hardware") or {}
    rows: list[tuple[str, Any]] = []
    for key, label in (("platform", "platform"), ("cpu_count", "CPU cores"), ("python", "python")):
        if key in hardware:
            rows.append((label, hardware[key]))
    for key, label in (("ram_total_bytes", "RAM total"), ("ram_available_bytes", "RAM available at start"),
                       ("cgroup_limit_bytes", "cgroup memory limit"), ("swap_total_bytes", "swap")):
        if hardware.get(key) is not None:
            rows.append((label, gb(hardware[key])))
    for index, gpu in enumerate(hardware.get("gpus") or []):
        rows.append((f"GPU {index}", f"{gpu.get('name', '?')}, {gb(gpu.get('total_bytes'))}"))
    if not hardware.get("gpus"):
        rows.append(("GPUs", "none"))
    versions = list((data.run.get("versions") or {}).items())
    left = section("Hardware", key_values(rows) if rows else "<p>Not recorded.</p>")
    right = section("Versions", key_values(versions) if versions else "<p>Not recorded.</p>")
    return f'<div class="grid2" style="margin-bottom:18px">{left}{right}</div>'


def render_run(data: RunData) -> str:
    status_text = STATUS_TEXT.get(data.status, data.status)
    estimate_svg = plots.estimate_plot([("estimate (before the run)", data.estimate_bytes, plots.COLORS["estimate"]),
                                        ("measured peak", data.peak_bytes, plots.COLORS["peak"]),
                                        ("limit", data.limit_bytes, plots.COLORS["limit"])])
    parts = [_summary_cards(data)]
    if data.problems:
        parts.append('<p class="problems">' + "<br>".join(esc(problem) for problem in data.problems) + "</p>")
    parts.append(section("How it ended", _ending(data), "ending"))
    parts.append(_memory_section(data))
    loss_svg = plots.loss_plot(data.steps, data.evals)
    if loss_svg:
        parts.append(section("Loss and learning rate", loss_svg, "loss"))
    throughput_svg = plots.throughput_plot(data.steps)
    if throughput_svg:
        parts.append(section("Throughput", throughput_svg, "throughput"))
    if estimate_svg:
        ratio = (f"<p>measured / estimated: <b>{data.peak_bytes / data.estimate_bytes:.2f}</b> (the estimate is "
                 "`memfit estimate` for this config, computed at the start of the run).</p>"
                 if data.peak_bytes and data.estimate_bytes else "")
        parts.append(section("Estimate vs measured peak", estimate_svg + ratio, "estimate"))
    parts += [_lives_table(data), _checkpoints_table(data), _events_table(data), _config_section(data),
              _hardware_section(data)]
    config = data.config
    subtitle = (f"{data.model} · {config.get('method', '?')} · {data.run.get('device', '?')} "
                f"{data.run.get('precision', '')} · run dir {data.path}")
    return document(f"memfit report: {data.path.name}", "memfit run report",
                    (STATUS_TONE.get(data.status, "info"), status_text), subtitle, "".join(parts))
