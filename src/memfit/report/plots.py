"""The report's plots: matplotlib (Agg) figures turned into inline SVG, so the page needs no server and no network.

Text stays text in the SVG (svg.fonttype none): the page's font draws it, and the numbers on the axes can be
searched and copied. Long runs are thinned to at most MAX_POINTS per line: memory by the highest value of each
bucket (a peak is never thinned away), the rest by taking every n-th step.
"""

from __future__ import annotations

import io
import re
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from memfit.units import GB, format_gb
MAX_POINTS = 2000

# One palette for the page and the plots (the CSS uses the same colours).
COLORS = {"rss": "#2563eb", "peak": "#0ea5e9", "cuda_allocated": "#7c3aed", "cuda_reserved": "#db2777",
          "limit": "#dc2626", "threshold": "#f59e0b", "estimate": "#16a34a", "loss": "#2563eb",
          "avg_loss": "#1e3a8a", "val_loss": "#db2777", "lr": "#9ca3af", "tokens": "#0d9488",
          "checkpoint": "#64748b", "oom": "#dc2626", "leak": "#7c3aed", "life": "#94a3b8"}
STYLE = {
    "svg.fonttype": "none", "font.family": "sans-serif", "font.sans-serif": ["DejaVu Sans"], "font.size": 9.5,
    "axes.spines.top": False, "axes.spines.right": False, "axes.edgecolor": "#cbd5e1", "axes.labelcolor": "#334155",
    "axes.titlesize": 11, "axes.titleweight": "bold", "axes.titlecolor": "#0f172a", "axes.titlelocation": "left",
    "axes.grid": True, "grid.color": "#e2e8f0", "grid.linewidth": 0.8, "xtick.color": "#475569",
    "ytick.color": "#475569", "legend.frameon": False, "legend.fontsize": 8.5, "figure.dpi": 100,
    "svg.hashsalt": "memfit",  # stable ids: the same run renders the same file
}


def to_svg(figure) -> str:
    """The figure as an <svg> element to put inline in HTML (no XML prolog, DOCTYPE or metadata: the DOCTYPE
    names the SVG DTD by URL, and the page must hold none)."""
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    plt.close(figure)
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    # Width/height in pt make the page rescale oddly; the CSS sizes the figure to its card instead.
    return re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', r'<svg\1 class="plot"', text, count=1)


def thin(xs: Sequence[float], ys: Sequence[float], keep_peaks: bool = False) -> tuple[list, list]:
    if len(xs) <= MAX_POINTS:
        return list(xs), list(ys)
    size = -(-len(xs) // MAX_POINTS)
    if not keep_peaks:
        return list(xs[::size]), list(ys[::size])
    out_x, out_y = [], []
    for start in range(0, len(xs), size):
        bucket = range(start, min(start + size, len(xs)))
        best = max(bucket, key=lambda index: ys[index])
        out_x.append(xs[best])
        out_y.append(ys[best])
    return out_x, out_y


def _series(steps: list[dict[str, Any]], key: str, scale: float = 1.0) -> tuple[list, list]:
    xs, ys = [], []
    for step in steps:
        value = step.get(key)
        if isinstance(value, (int, float)) and value == value:
            xs.append(step["step"])
            ys.append(value / scale)
    return xs, ys


def memory_plot(steps: list[dict[str, Any]], *, limit_bytes: int | None, threshold: float | None,
                estimate_bytes: int | None, guard_events: list[dict[str, Any]], ooms: list[dict[str, Any]],
                checkpoints: list[int], life_starts: list[int]) -> str | None:
    """Memory per step in GB: RSS, the peak the guard watched, CUDA allocated/reserved where there is a GPU; the
    limit, the threshold and the estimate as lines; where the guard acted, OOMs were recovered and checkpoints
    were written, as markers."""
    if not steps:
        return None
    with plt.rc_context(STYLE):
        figure, axes = plt.subplots(figsize=(11, 4.2))
        peak_by_step = _memory_curves(axes, steps)
        measured_top = max(peak_by_step.values(), default=0)
        top = _memory_levels(axes, measured_top, limit_bytes, threshold, estimate_bytes)
        for life_start in life_starts:
            axes.axvline(life_start - 0.5, color=COLORS["life"], linewidth=1.2, linestyle="-.")
        for step in checkpoints:
            axes.axvline(step, color=COLORS["checkpoint"], linewidth=0.8, alpha=0.45, linestyle=":")
        _event_markers(axes, guard_events, ooms, peak_by_step, steps[0]["step"], top)
        handles, labels = axes.get_legend_handles_labels()
        if checkpoints:
            handles.append(Line2D([], [], color=COLORS["checkpoint"], linestyle=":", linewidth=1.2))
            labels.append("checkpoint saved")
        if life_starts:
            handles.append(Line2D([], [], color=COLORS["life"], linestyle="-.", linewidth=1.2))
            labels.append("supervisor restart")
        axes.set_ylim(0, top * 1.12 if top else 1)
        axes.set_xlabel("step")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel("GB")
        axes.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        if limit_bytes and 0 < measured_top < ZOOM_BELOW * limit_bytes / GB:
            _zoom_inset(axes, steps, estimate_bytes)
        return to_svg(figure)


def _memory_curves(axes, steps: list[dict[str, Any]]) -> dict[int, float]:
    """The measured curves (those the steps hold); the guard's watched peak of each step, in GB, by step."""
    peak_by_step = {}
    for key, label, color, width in (
            ("watched_bytes", "peak in step (guard watches)", COLORS["peak"], 2.0),
            ("rss_bytes", "RSS at step end", COLORS["rss"], 1.4),
            ("cuda_reserved_bytes", "GPU reserved", COLORS["cuda_reserved"], 1.6),
            ("cuda_allocated_bytes", "GPU allocated", COLORS["cuda_allocated"], 1.4)):
        xs, ys = _series(steps, key, GB)
        if not xs:
            continue
        if key == "watched_bytes":
            peak_by_step = dict(zip(xs, ys))
        xs, ys = thin(xs, ys, keep_peaks=True)
        axes.plot(xs, ys, label=label, color=color, linewidth=width, marker="o" if len(xs) <= 40 else None,
                  markersize=3)
    return peak_by_step


def _memory_levels(axes, top: float, limit_bytes: int | None, threshold: float | None,
                   estimate_bytes: int | None) -> float:
    """The limit, the threshold and the estimate as horizontal lines; the plot's top in GB (above all of them and
    the measured `top`)."""
    if limit_bytes:
        axes.axhline(limit_bytes / GB, color=COLORS["limit"], linewidth=1.8, label=f"limit {format_gb(limit_bytes)}")
        top = max(top, limit_bytes / GB)
        if threshold:
            axes.axhline(limit_bytes * threshold / GB, color=COLORS["threshold"], linewidth=1.4, linestyle="--",
                         label=f"threshold {threshold:.0%} ({format_gb(limit_bytes * threshold)})")
    if estimate_bytes:
        axes.axhline(estimate_bytes / GB, color=COLORS["estimate"], linewidth=1.4, linestyle=":",
                     label=f"estimate {format_gb(estimate_bytes)}")
        top = max(top, estimate_bytes / GB)
    return top


def _event_markers(axes, guard_events: list[dict[str, Any]], ooms: list[dict[str, Any]],
                   peak_by_step: dict[int, float], first_step: int, top: float) -> None:
    """Where the guard acted and where OOMs were recovered, one legend entry per kind."""
    markers = {"threshold": ("^", COLORS["threshold"], "guard: threshold"),
               "limit": ("X", COLORS["limit"], "guard: stop"), "early_stop": ("X", COLORS["limit"], "guard: stop"),
               "leak": ("D", COLORS["leak"], "guard: leak")}
    shown = set()
    for event in guard_events:
        marker, color, label = markers.get(event.get("kind"), ("s", COLORS["limit"], "guard"))
        step = max(event.get("step") or first_step, first_step)
        value = (event.get("watched_bytes") or 0) / GB or peak_by_step.get(step, 0)
        axes.plot([step], [value], linestyle="none", marker=marker, markersize=10, color=color,
                  markeredgecolor="white", markeredgewidth=1.0, zorder=5, label=None if label in shown else label)
        shown.add(label)
    for event in ooms:
        step = event.get("step") or first_step
        axes.plot([step], [peak_by_step.get(step, top * 0.5)], linestyle="none", marker="*", markersize=13,
                  color=COLORS["oom"], markeredgecolor="white", zorder=6,
                  label=None if "oom" in shown else "OOM recovered (micro-batch halved)")
        shown.add("oom")


# A run far under its limit (an auto limit of 80% of a big machine) draws as a flat line at the bottom: below this
# fraction of the limit, an inset shows the measured curves at their own scale.
ZOOM_BELOW = 0.3


def _zoom_inset(axes, steps: list[dict[str, Any]], estimate_bytes: int | None) -> None:
    inset = axes.inset_axes([0.07, 0.14, 0.6, 0.42])
    values = []
    for key, color, width in (("watched_bytes", COLORS["peak"], 1.6), ("rss_bytes", COLORS["rss"], 1.1),
                              ("cuda_reserved_bytes", COLORS["cuda_reserved"], 1.3)):
        xs, ys = _series(steps, key, GB)
        if xs:
            xs, ys = thin(xs, ys, keep_peaks=True)
            inset.plot(xs, ys, color=color, linewidth=width)
            values += ys
    if estimate_bytes:
        inset.axhline(estimate_bytes / GB, color=COLORS["estimate"], linewidth=1.2, linestyle=":")
        values.append(estimate_bytes / GB)
    low, high = min(values), max(values)
    pad = max((high - low) * 0.15, high * 0.01)
    inset.set_ylim(max(0.0, low - pad), high + pad)
    inset.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=5))
    inset.tick_params(labelsize=8)
    inset.set_title("measured, at its own scale (GB)", fontsize=8.5)
    inset.set_facecolor("white")


def loss_plot(steps: list[dict[str, Any]], evals: list[dict[str, Any]]) -> str | None:
    """Loss per step (and its running average and the validation loss), the learning rate on a second axis."""
    xs, ys = _series(steps, "loss")
    if not xs:
        return None
    with plt.rc_context(STYLE):
        figure, axes = plt.subplots(figsize=(11, 3.6))
        axes.plot(*thin(xs, ys), color=COLORS["loss"], linewidth=1.0, alpha=0.55, label="loss")
        avg_x, avg_y = _series(steps, "avg_loss")
        if avg_x:
            axes.plot(*thin(avg_x, avg_y), color=COLORS["avg_loss"], linewidth=2.0, label="loss (running avg)")
        val = [(event["step"], event["val_loss"]) for event in evals
               if isinstance(event.get("val_loss"), (int, float)) and event.get("step") is not None]
        if val:
            axes.plot([step for step, _ in val], [loss for _, loss in val], color=COLORS["val_loss"], marker="o",
                      linewidth=1.8, markersize=5, label="validation loss")
        axes.set_xlabel("step")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel("loss")
        lr_x, lr_y = _series(steps, "lr")
        handles, labels = axes.get_legend_handles_labels()
        if lr_x:
            lr_axes = axes.twinx()
            lr_axes.grid(False)
            lr_axes.spines["right"].set_visible(True)
            (line,) = lr_axes.plot(*thin(lr_x, lr_y), color=COLORS["lr"], linewidth=1.4, linestyle="--")
            lr_axes.set_ylabel("learning rate")
            lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
            lr_axes.set_ylim(bottom=0)
            handles.append(line)
            labels.append("learning rate")
        axes.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.08, 1.0))
        return to_svg(figure)


def throughput_plot(steps: list[dict[str, Any]]) -> str | None:
    """Tokens/s per step, and the micro-batch as a step line where it changed (an OOM recovery, a restart)."""
    xs, ys = _series(steps, "tokens_per_s")
    if not xs:
        return None
    with plt.rc_context(STYLE):
        figure, axes = plt.subplots(figsize=(11, 3.0))
        axes.plot(*thin(xs, ys), color=COLORS["tokens"], linewidth=1.6, label="tokens/s",
                  marker="o" if len(xs) <= 40 else None, markersize=3)
        axes.set_ylim(bottom=0)
        axes.set_xlabel("step")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel("tokens/s")
        handles, labels = axes.get_legend_handles_labels()
        micro_x, micro_y = _series(steps, "micro_batch")
        if micro_x and len(set(micro_y)) > 1:
            micro_axes = axes.twinx()
            micro_axes.grid(False)
            micro_axes.spines["right"].set_visible(True)
            (line,) = micro_axes.step(micro_x, micro_y, where="post", color=COLORS["checkpoint"], linewidth=1.2)
            micro_axes.set_ylabel("micro-batch")
            micro_axes.set_ylim(0, max(micro_y) * 1.2)
            handles.append(line)
            labels.append("micro-batch")
        axes.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.08, 1.0))
        return to_svg(figure)


def estimate_plot(bars: list[tuple[str, int, str]]) -> str | None:
    """Horizontal bars in GB: the estimator's prediction, the measured peak, the limit."""
    bars = [(label, value, color) for label, value, color in bars if value]
    if not bars:
        return None
    with plt.rc_context(STYLE):
        figure, axes = plt.subplots(figsize=(11, 0.42 * len(bars) + 0.6))
        labels = [label for label, _, _ in bars][::-1]
        values = [value / GB for _, value, _ in bars][::-1]
        colors = [color for _, _, color in bars][::-1]
        axes.barh(labels, values, color=colors, height=0.6)
        for index, value in enumerate(values):
            axes.text(value, index, f"  {value:.2f} GB", va="center", fontsize=9, color="#0f172a")
        axes.set_xlim(0, max(values) * 1.18)
        axes.grid(axis="y", visible=False)
        axes.set_xlabel("GB")
        return to_svg(figure)


OUTCOME_STYLE = {"fits": ("o", "#16a34a", "fits"), "over_limit": ("X", "#f59e0b", "over the limit (guard stop)"),
                 "oom": ("X", "#dc2626", "out of memory"), "error": ("s", "#64748b", "error")}


def probe_plot(entry: dict[str, Any], title: str = "") -> str | None:
    """One probe entry: the measured peak per trial against the batch size (one line per value of a second axis),
    the estimator's prediction, the limit and the limit less the margin."""
    trials = [trial for trial in entry.get("trials") or [] if (trial.get("settings") or {}).get("batch_size")]
    if not trials:
        return None
    search = entry.get("search") or ["batch"]
    second = {"rank": "lora_rank", "seq": "seq_len"}.get(search[1]) if len(search) > 1 else None
    groups: dict[Any, list[dict[str, Any]]] = {}
    for trial in trials:
        groups.setdefault(trial["settings"].get(second) if second else None, []).append(trial)
    with plt.rc_context(STYLE):
        figure, axes = plt.subplots(figsize=(11, 4.0))
        shown = set()
        palette = ["#2563eb", "#0d9488", "#7c3aed", "#db2777", "#ea580c", "#475569"]
        for index, (value, group) in enumerate(sorted(groups.items(), key=lambda item: (item[0] is None, item[0]))):
            group = sorted(group, key=lambda trial: trial["settings"]["batch_size"])
            color = palette[index % len(palette)]
            suffix = f" ({second} {value})" if second else ""
            measured = [(t["settings"]["batch_size"], t["peak_bytes"] / GB) for t in group if t.get("peak_bytes")]
            if measured:
                axes.plot(*zip(*measured), color=color, linewidth=1.6, label=f"measured peak{suffix}")
            predicted = [(t["settings"]["batch_size"], t["estimate_bytes"] / GB) for t in group
                         if t.get("estimate_bytes")]
            if predicted:
                axes.plot(*zip(*predicted), color=color, linewidth=1.2, linestyle=":", label=f"estimate{suffix}")
            for trial in group:
                if not trial.get("peak_bytes"):
                    continue
                marker, marker_color, label = OUTCOME_STYLE.get(trial.get("status"), OUTCOME_STYLE["error"])
                if trial.get("status") == "fits" and not trial.get("usable", True):
                    marker_color, label = "#a3e635", "fits, but no room for the margin"
                axes.plot([trial["settings"]["batch_size"]], [trial["peak_bytes"] / GB], linestyle="none",
                          marker=marker, markersize=9, color=marker_color, markeredgecolor="white", zorder=5,
                          label=None if label in shown else label)
                shown.add(label)
        limit = entry.get("limit_bytes")
        if limit:
            axes.axhline(limit / GB, color=COLORS["limit"], linewidth=1.8, label=f"limit {format_gb(limit)}")
            margin = entry.get("margin")
            if margin:
                axes.axhline(limit / (1 + margin) / GB, color=COLORS["threshold"], linewidth=1.3, linestyle="--",
                             label=f"limit less the {margin:.0%} margin")
        chosen = (entry.get("chosen") or {}).get("batch_size")
        if chosen:
            axes.axvline(chosen, color="#16a34a", linewidth=1.2, linestyle="-.", label=f"chosen batch {chosen}")
        axes.set_ylim(bottom=0)
        axes.set_xlabel("batch size")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel("GB")
        if title:
            axes.set_title(title)
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return to_svg(figure)
