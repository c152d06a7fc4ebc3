"""`memfit report`: one self-contained HTML file for a training run directory or a probe profile.

`write_report` renders on request (and fails with a UserError on a bad path); `write_report_safely` is what a
run's end calls: it never raises, so a report that cannot be written (a full disk, a bug, a missing plotting
library) never changes how the run ended, and says so in a warning Notice instead. The trainer and the supervisor
know nothing of the report: the entry points (memfit.api) pass their events through `report_at_end`, the sink that
writes it when the run ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from memfit.errors import UserError
from memfit.events import ChildEnded, Event, Notice, RunEnded

REPORT_HTML = "report.html"


def default_out(path: Path) -> Path:
    """RUN_DIR/report.html for a run; PROFILE.html next to a profile."""
    return path / REPORT_HTML if path.is_dir() else path.with_suffix(".html")


def render_html(path: Path) -> str:
    """The report page for `path`: a run directory or a probe profile JSON."""
    from memfit.report.profile_report import is_profile_file, read_profile_file, render_profile
    from memfit.report.rundata import read_run_dir

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist",
                        hint="pass a run directory (memfit train --output-dir) or a probe profile JSON")
    if path.is_file():
        if not is_profile_file(path):
            raise UserError(f"{path} is not a memfit probe profile (a JSON file written by `memfit probe`)",
                            hint="pass a run directory or a profile from the memfit cache's profiles/ folder")
        return render_profile(read_profile_file(path), path)
    from memfit.report.run_report import render_run

    return render_run(read_run_dir(path))


def write_report(path: Path, out: Path | None = None) -> Path:
    """Render the report of `path` to `out` (default: see `default_out`); the file written."""
    from memfit.report.page import write_html

    path = Path(path)
    text = render_html(path)
    target = Path(out) if out is not None else default_out(path)
    if target.is_dir():
        raise UserError(f"--out {target} is a directory", hint="give a file name, e.g. report.html")
    try:
        return write_html(target, text)
    except OSError as error:
        raise UserError(f"cannot write {target}: {error.strerror or error}",
                        hint="choose another --out, or free space on that disk") from None


def write_report_safely(run_dir: Path, emit: Callable | None = None) -> Path | None:
    """RUN_DIR/report.html at a run's end; a failure becomes a warning Notice (through `emit`), never an error."""
    try:
        path = write_report(Path(run_dir))
    except Exception as error:  # the run's outcome must not depend on its report
        if emit is not None:
            try:
                emit(Notice(f"could not write the run report in {run_dir}: {error}; `memfit report {run_dir}` "
                            "tries again", "warning"))
            except Exception:
                pass
        return None
    if emit is not None:
        try:
            emit(Notice(f"run report: {path}"))
        except Exception:
            pass
    return path


def ends_the_run(event: Event) -> bool:
    """The event after which a run directory is complete: the trainer's end (a reload goes on in a new process),
    or a supervisor's last life (its report covers every life)."""
    if isinstance(event, RunEnded):
        return event.status != "reload"
    return isinstance(event, ChildEnded) and event.action in ("exit", "give_up")


def report_at_end(run_dir: Path, on_event: Callable[[Event], None] | None = None) -> Callable[[Event], None]:
    """A sink for an entry point's events: each goes on to `on_event`; when the run ends (`ends_the_run`),
    RUN_DIR/report.html is written, and a Notice says where (or why not)."""

    def sink(event: Event) -> None:
        if on_event is not None:
            on_event(event)
        if ends_the_run(event):
            write_report_safely(run_dir, on_event)

    return sink
