"""Errors that the CLI maps to exit codes (see DESIGN.md: 2 bad input, 3 guard stop, 4 unrecoverable OOM).

The library raises these; only the CLI decides how they look. A `UserError` message is one line that says what is
wrong, where, and what to do about it.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_GUARD_STOP = 3
EXIT_OOM = 4
# A supervised child that checkpointed and ended on purpose, to be started again (`--reload-interval`); BSD's
# EX_TEMPFAIL. The user never sees it: `memfit train --supervise` restarts the child and exits with the run's code.
EXIT_RELOAD = 75
EXIT_INTERRUPTED = 130


class MemfitError(Exception):
    """Base class for every error memfit raises on purpose."""

    exit_code = 1


class UserError(MemfitError):
    """Bad usage or bad input: the user can fix it. One line, exit 2, no traceback."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = " ".join(self.message.split())
        if self.hint:
            text = f"{text} — {' '.join(self.hint.split())}"
        return text


def error_line(error: MemfitError) -> str:
    """What the user sees of an expected failure: the one line (with its hint) of a UserError."""
    return error.one_line() if isinstance(error, UserError) else str(error)


class ModelNotFoundError(UserError):
    """`--model` names nothing we can resolve (no local dir, not in the HF cache, no alias)."""


class WeightsMissingError(UserError):
    """The model's config is known but its weight files are not on this machine."""


class WeightsDamagedError(UserError):
    """The weight files are there but unusable (cut short, empty, a broken header, a shard missing or not holding
    what the index says): one line naming the file and how to get it again, exit 2, before the model loads."""


class DiskFullError(UserError):
    """The output directory's disk filled up while writing (a checkpoint, the final adapter): one line, exit 2."""


class OutOfMemoryError(UserError):
    """Out of memory where no recovery is possible (e.g. loading the model): one line, exit 4."""

    exit_code = EXIT_OOM
