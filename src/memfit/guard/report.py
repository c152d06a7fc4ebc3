"""The memory report: a plain-text box the CLI prints at start, every --memory-report-interval steps and at a stop.

It returns a string; printing (and colour) is the caller's business.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memfit.guard.policy import HostLimit, MemoryLimit
    from memfit.guard.sampler import MemorySample

from memfit.units import format_gb
RULE = "━" * 60
_LABEL_WIDTH = 19  # "System Available:  " — the longest label and its gap


def memory_report(sample: MemorySample, limit: MemoryLimit, threshold: float,
                  peak_watched_bytes: int | None = None, host: HostLimit | None = None) -> str:
    """The report box for one reading. Usage is watched bytes (CUDA reserved on a GPU, else RSS) over the limit;
    with `host` (a GPU's run) the host RAM limits too."""
    watched = sample.watched_bytes
    limit_bytes = limit.limit_bytes
    threshold_bytes = limit_bytes * threshold
    if limit.auto:
        fraction = limit_bytes / limit.available_bytes if limit.available_bytes else 0.0
        limit_text = f"{format_gb(limit_bytes)} (auto: {fraction:.0%} of {format_gb(limit.available_bytes)} available)"
    else:
        limit_text = f"{format_gb(limit_bytes)} (--max-memory)"
    rows = [
        ("Process RSS:", format_gb(sample.rss_bytes)),
        ("Max RSS:", format_gb(sample.peak_rss_bytes)),
        ("System Available:", format_gb(sample.system_available_bytes)),
        ("Limit:", limit_text),
        ("Usage:", f"{watched / limit_bytes * 100:.1f}% of limit" if limit_bytes else "n/a"),
    ]
    if peak_watched_bytes is not None:
        rows.append(("Peak:", f"{format_gb(peak_watched_bytes)} ({peak_watched_bytes / limit_bytes * 100:.1f}% "
                              "of limit)" if limit_bytes else format_gb(peak_watched_bytes)))
    rows += [
        ("Threshold:", f"{threshold:.0%} ({format_gb(threshold_bytes)})"),
        ("Status:", "⚠️  OVER THRESHOLD" if watched >= threshold_bytes else "OK"),
    ]
    for label, value in (("GPU allocated:", sample.cuda_allocated_bytes),
                         ("GPU reserved:", sample.cuda_reserved_bytes),
                         ("GPU max reserved:", sample.cuda_max_reserved_bytes),
                         ("GPU used (NVML):", sample.nvml_used_bytes)):
        if value is not None:
            rows.append((label, format_gb(value)))
    if host is not None:
        source = "auto" if host.rss.auto else "--max-host-memory"
        rows += [("Host RSS limit:", f"{format_gb(host.rss.limit_bytes)} ({source}; RSS at "
                                     f"{sample.rss_bytes / host.rss.limit_bytes:.0%})"),
                 ("Host floor:", f"{format_gb(host.floor_bytes)} available")]
    lines = [RULE, "Memory Usage Report", RULE]
    lines += [f"  {label:<{_LABEL_WIDTH}}{value}" for label, value in rows]
    lines.append(RULE)
    return "\n".join(lines)
