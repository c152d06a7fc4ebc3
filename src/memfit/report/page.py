"""The HTML page: one file with its CSS and its plots inline, so it opens offline, by mail, from a USB stick.

Every value from the run goes through `html.escape`: a model path or a data line may hold anything.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any, Iterable

from memfit.files import write_atomic
from memfit.units import format_gb

CSS = """
:root { --ink:#0f172a; --muted:#64748b; --line:#e2e8f0; --card:#ffffff; --bg:#f1f5f9; --accent:#2563eb;
        --ok:#16a34a; --warn:#d97706; --bad:#dc2626; --info:#475569; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
       font: 14px/1.5 -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif; }
header { background:linear-gradient(120deg,#0f172a,#1e3a8a); color:#fff; padding:28px 40px 24px; }
header h1 { margin:0 0 4px; font-size:24px; font-weight:650; letter-spacing:-0.01em; }
header .sub { color:#cbd5e1; font-size:13px; word-break:break-all; }
main { max-width:1240px; margin:0 auto; padding:24px 32px 48px; }
.badge { display:inline-block; padding:3px 12px; border-radius:999px; font-size:13px; font-weight:600;
         margin-left:10px; vertical-align:middle; }
.badge.ok { background:#dcfce7; color:#166534; } .badge.warn { background:#fef3c7; color:#92400e; }
.badge.bad { background:#fee2e2; color:#991b1b; } .badge.info { background:#e2e8f0; color:#334155; }
.cards { display:grid; grid-template-columns:repeat(auto-fill,minmax(170px,1fr)); gap:12px; margin:0 0 20px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:12px 14px; }
.card .label { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.card .value { font-size:21px; font-weight:650; margin-top:2px; font-variant-numeric:tabular-nums; }
.card .note { color:var(--muted); font-size:12px; }
section { background:var(--card); border:1px solid var(--line); border-radius:12px; padding:18px 22px;
          margin:0 0 18px; }
section h2 { margin:0 0 12px; font-size:16px; }
svg.plot { width:100%; height:auto; display:block; }
table { border-collapse:collapse; width:100%; font-size:13px; }
th, td { text-align:left; padding:6px 10px; border-bottom:1px solid var(--line); vertical-align:top; }
th { color:var(--muted); font-weight:600; font-size:12px; text-transform:uppercase; letter-spacing:.03em; }
td.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
td code, p code { background:#f1f5f9; padding:1px 5px; border-radius:4px; font-size:12.5px; word-break:break-all; }
.grid2 { display:grid; grid-template-columns:1fr 1fr; gap:18px; }
.grid2 section { margin:0; }
.kv td:first-child { color:var(--muted); width:42%; }
.stop { border-left:4px solid var(--info); padding:10px 14px; background:#f8fafc; border-radius:6px; }
.stop.ok { border-color:var(--ok); } .stop.warn { border-color:var(--warn); } .stop.bad { border-color:var(--bad); }
.problems { color:#92400e; background:#fffbeb; border:1px solid #fde68a; border-radius:8px; padding:8px 14px; }
.level-warning td:first-child { color:var(--warn); font-weight:600; }
footer { color:var(--muted); font-size:12px; text-align:center; padding:0 0 32px; }
@media (max-width: 900px) { .grid2 { grid-template-columns:1fr; } main { padding:16px; } }
"""

STATUS_TONE = {"done": "ok", "found": "ok", "guard_stop": "warn", "interrupted": "info", "reload": "info",
               "oom": "bad", "disk_full": "bad", "running": "bad", "nothing_fits": "bad"}


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def gb(nbytes: float | None) -> str:
    return "–" if nbytes is None else format_gb(nbytes)


def card(label: str, value: str, note: str = "") -> str:
    note_html = f'<div class="note">{esc(note)}</div>' if note else ""
    return (f'<div class="card"><div class="label">{esc(label)}</div><div class="value">{esc(value)}</div>'
            f"{note_html}</div>")


def table(headers: Iterable[str], rows: Iterable[Iterable[Any]], numeric: Iterable[int] = (),
          row_classes: Iterable[str] | None = None) -> str:
    numeric = set(numeric)
    head = "".join(f"<th>{esc(name)}</th>" for name in headers)
    body = []
    classes = list(row_classes) if row_classes is not None else None
    for index, row in enumerate(rows):
        cells = "".join(f'<td class="num">{esc(cell)}</td>' if column in numeric else f"<td>{cell_html(cell)}</td>"
                        for column, cell in enumerate(row))
        klass = f' class="{esc(classes[index])}"' if classes and classes[index] else ""
        body.append(f"<tr{klass}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class Code(str):
    """A table cell shown as code (a path, a command)."""


def cell_html(cell: Any) -> str:
    if isinstance(cell, Code):
        return f"<code>{esc(cell)}</code>"
    if isinstance(cell, bool):
        return "true" if cell else "false"  # as the YAML config writes them
    if isinstance(cell, float):
        return esc(f"{cell:.6g}")
    return esc("–" if cell is None else cell)


def key_values(items: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><td>{esc(key)}</td><td>{cell_html(value)}</td></tr>" for key, value in items)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def section(title: str, body: str, anchor: str = "") -> str:
    ident = f' id="{esc(anchor)}"' if anchor else ""
    return f"<section{ident}><h2>{esc(title)}</h2>{body}</section>"


def document(title: str, header_title: str, badge: tuple[str, str], subtitle: str, body: str) -> str:
    tone, text = badge
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f'<header><h1>{esc(header_title)}<span class="badge {esc(tone)}">{esc(text)}</span></h1>'
        f'<div class="sub">{esc(subtitle)}</div></header>'
        f"<main>{body}</main>"
        f"<footer>memfit report · generated {esc(generated)} · one self-contained file</footer>"
        "</body></html>\n"
    )


def write_html(path: Path, text: str) -> Path:
    """Written whole or not at all (a report open in a browser never shows half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)
    return path
