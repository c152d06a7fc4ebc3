"""The report of a probe profile: per probed setup, the measured peak against the batch size, with the limit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memfit.errors import UserError
from memfit.report import plots
from memfit.report.page import STATUS_TONE, card, document, gb, key_values, section, table


def read_profile_file(path: Path) -> dict[str, Any]:
    from memfit.probe.profile import read_profile

    return read_profile(path)


def is_profile_file(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "memfit_profile" in data


def _entry_section(entry: dict[str, Any], index: int) -> str:
    search = entry.get("search") or ["batch"]
    second = {"rank": "lora_rank", "seq": "seq_len"}.get(search[1]) if len(search) > 1 else None
    chosen = entry.get("chosen") or {}
    limit = entry.get("limit_bytes")
    calibration = entry.get("calibration") or {}
    trials = entry.get("trials") or []
    names = {"batch_size": "batch", "lora_rank": "rank", "seq_len": "seq"}
    chosen_text = ", ".join(f"{names[key]} {value}" for key, value in chosen.items() if key in names) or "nothing fits"
    cards = [card("chosen", chosen_text, "largest usable" if chosen else "not even the smallest batch"),
             card("limit", gb(limit), "auto" if entry.get("limit_auto") else "--max-memory"),
             card("margin", f"{entry.get('margin', 0):.0%}", "peak × (1 + margin) ≤ limit"),
             card("trials", str(len(trials)), f"{entry.get('steps', '?')} steps each"),
             card("measured / estimated", f"{calibration['ratio']:.3f}" if calibration.get("ratio") else "–",
                  f"median of {calibration.get('trials', 0)} trial(s)" if calibration else "")]
    setup = entry.get("setup") or {}
    svg = plots.probe_plot(entry)
    rows = []
    for trial in sorted(trials, key=lambda t: (t.get("settings", {}).get(second or "batch_size", 0),
                                               t.get("settings", {}).get("batch_size", 0))):
        settings = trial.get("settings") or {}
        peak, estimate = trial.get("peak_bytes"), trial.get("estimate_bytes")
        row = [settings.get("batch_size")]
        if second:
            row.append(settings.get(second))
        row += [trial.get("status"), "yes" if trial.get("usable") else "no", gb(peak), gb(estimate),
                f"{peak / estimate:.2f}" if peak and estimate else "–",
                f"{trial['tokens_per_s']:,.0f}" if trial.get("tokens_per_s") else "–", trial.get("detail", "")]
        rows.append(row)
    headers = ["batch"] + ([second] if second else []) + ["outcome", "usable", "peak", "estimate",
                                                          "measured/est.", "tokens/s", "detail"]
    numeric = (0, 1, 4, 5, 6, 7) if second else (0, 3, 4, 5, 6)
    body = (f'<div class="cards">{"".join(cards)}</div>' + (svg or "<p>No trial measured a peak.</p>")
            + table(headers, rows, numeric=numeric)
            + '<h2 style="margin-top:16px">Setup</h2>'
            + key_values([(key, value) for key, value in setup.items()]
                         + [("probed", entry.get("created_at", "–")), ("data", (entry.get("data") or {}).get("path"))]))
    return section(f"Setup {index + 1}: probed {entry.get('created_at', '')}", body, f"entry-{index + 1}")


def render_profile(profile: dict[str, Any], path: Path) -> str:
    entries = sorted(profile.get("entries", {}).values(), key=lambda entry: entry.get("created_at", ""),
                     reverse=True)
    if not entries:
        raise UserError(f"{path}: the profile has no entries", hint="pass a file written by `memfit probe`")
    model = profile.get("model") or {}
    machine = profile.get("machine") or {}
    facts = [(key, value) for key, value in machine.items() if key != "gpus"]
    for index, gpu in enumerate(machine.get("gpus") or []):
        facts.append((f"GPU {index}", f"{gpu.get('name')}, {gpu.get('memory_gib')} GiB"))
    parts = [_entry_section(entry, index) for index, entry in enumerate(entries)]
    parts.append(section("Machine", key_values(facts), "machine"))
    newest = entries[0]
    tone = STATUS_TONE["found" if newest.get("chosen") else "nothing_fits"]
    badge = "fits" if newest.get("chosen") else "nothing fits"
    subtitle = f"{model.get('name', '?')} · machine {machine.get('fingerprint', '?')} · {path}"
    return document(f"memfit probe report: {model.get('name', path.name)}", "memfit probe report",
                    (tone, badge), subtitle, "".join(parts))
