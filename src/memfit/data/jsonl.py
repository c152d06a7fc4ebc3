"""Read a JSONL training file and validate every line before anything is tokenized.

A bad line is the user's to fix, so every problem is a `UserError` that names `file:line`; nothing in a file
(bad bytes, bad JSON, deep nesting, wrong types, NaN) may escape as a traceback.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

from memfit.errors import UserError

ROLES = ("system", "user", "assistant")
MAX_AUTH_WEIGHT = 0.99
FORMAT_HINT = 'each line needs "text", "prompt" and "completion", or "messages"'
_FORMAT_NAMES = {"text": '"text"', "prompt_completion": '"prompt"/"completion"', "messages": '"messages"'}


@dataclass(frozen=True)
class Record:
    """One validated JSONL line."""

    line: int  # 1-based line number in the file
    kind: str  # "text" | "prompt_completion" | "messages"
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[dict, ...] | None = None  # each {"role": str, "content": str}
    auth_weight: float | None = None
    prov_entropy: float | None = None


class LineError(Exception):
    """A problem with the current line; `read_records` adds `file:line` and turns it into a UserError."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


def read_records(path: str | Path, *, require_distrust: bool = False) -> list[Record]:
    """Every record of the file, in order. Fails on the first bad line; blank lines are skipped.

    `require_distrust` (for `--loss distrust`) makes `auth_weight` and `prov_entropy` required on every line;
    without it they are optional but still checked when present.
    """
    path = Path(path)
    first: list[Record] = []

    def parse(text: str, number: int) -> Record:
        record = _parse(text, number, require_distrust)
        if first and record.kind != first[0].kind:
            raise LineError(
                f'uses the {_FORMAT_NAMES[record.kind]} format, but line {first[0].line} set the format '
                f"to {_FORMAT_NAMES[first[0].kind]}",
                hint="every line of a file must use the same format; split the file or convert the lines",
            )
        first[:1] = first or [record]
        return record

    records, saw_lines = read_lines(path, parse)
    if not records:
        why = "only blank lines" if saw_lines else "the file is empty"
        raise UserError(f"{path}: no training samples ({why})", hint=f"add one JSON object per line; {FORMAT_HINT}")
    return records


def read_lines(path: Path, parse: Callable[[str, int], Any]) -> tuple[list[Any], bool]:
    """`parse(text, line_number)` of every non-blank line, in order, and whether the file had any line at all. A
    LineError raised for a line becomes the one-line `file:line: what is wrong` UserError."""
    parsed, saw_lines = [], False
    for number, raw in _raw_lines(path):
        saw_lines = True
        try:
            text = _decode(raw, first=number == 1)
            if text.strip():
                parsed.append(parse(text, number))
        except LineError as err:
            raise UserError(f"{path}:{number}: {err.message}", hint=err.hint) from None
    return parsed, saw_lines


def json_object(text: str, hint: str) -> dict:
    """The line's JSON object, or a LineError saying why it is not one."""
    try:
        obj = json.loads(text)
    except RecursionError:
        raise LineError("not valid JSON (nested too deeply)", hint="each line must be one flat JSON object") from None
    except ValueError as err:
        # The other ValueError is Python's 4300-digit limit on ints; its own text suggests a Python call.
        detail = f"{err.msg} at column {err.colno}" if isinstance(err, json.JSONDecodeError) else "a number is too long"
        raise LineError(f"not valid JSON ({detail})", hint="each line must be one JSON object") from None
    if not isinstance(obj, dict):
        raise LineError(f"must be a JSON object, got {json_type(obj)}", hint=hint)
    return obj


def _raw_lines(path: Path):
    """(line number, bytes without the line ending) for each line; OS errors become one-line UserErrors."""
    try:
        with path.open("rb") as handle:
            # Binary iteration splits on b"\n" only: JSONL's line ending, and U+2028 inside a string stays put.
            for number, raw in enumerate(handle, start=1):
                yield number, raw.rstrip(b"\r\n")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file", hint="check the path to the JSONL training file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a JSONL file", hint="pass the path of a .jsonl file") from None
    except PermissionError:
        raise UserError(f"{path}: cannot read the file (permission denied)", hint="check its permissions") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read the file ({err.strerror or err})") from None


def _decode(raw: bytes, *, first: bool) -> str:
    if first and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte-order mark, as some Windows editors write it: harmless, so dropped
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        # Everything before the bad byte decoded, so this is the column an editor shows.
        column = len(raw[: err.start].decode("utf-8")) + 1
        raise LineError(
            f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {column})",
            hint="save the file as UTF-8",
        ) from None


def _parse(text: str, number: int, require_distrust: bool) -> Record:
    obj = json_object(text, FORMAT_HINT)

    has_text, has_messages = "text" in obj, "messages" in obj
    has_pc = "prompt" in obj or "completion" in obj
    if has_text + has_messages + has_pc > 1:
        present = [name for name, has in (('"text"', has_text), ('"prompt"/"completion"', has_pc),
                                          ('"messages"', has_messages)) if has]
        raise LineError(f"has both {' and '.join(present)}", hint="use one format per line")

    if has_text:
        kind, fields = "text", {"text": string_field(obj, "text")}
    elif has_pc:
        for key in ("prompt", "completion"):
            if key not in obj:
                other = "completion" if key == "prompt" else "prompt"
                raise LineError(f'has "{other}" but no "{key}"', hint=FORMAT_HINT)
        kind = "prompt_completion"
        fields = {"prompt": string_field(obj, "prompt"), "completion": string_field(obj, "completion")}
    elif has_messages:
        kind, fields = "messages", {"messages": _messages(obj["messages"])}
    else:
        raise LineError(f'missing "text" ({FORMAT_HINT})', hint='for example {"text": "..."}')
    return Record(number, kind, **fields, **_distrust_fields(obj, require_distrust))


def string_field(obj: dict, key: str, where: str | None = None) -> str:
    value = obj[key]
    name = where or f'"{key}"'
    if not isinstance(value, str):
        raise LineError(f"{name} must be a string, got {json_type(value)}")
    if not value:
        raise LineError(f"{name} is empty", hint="remove the line or give it content")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        # JSON's "\ud800" escapes decode to lone surrogates, which no tokenizer can encode.
        raise LineError(
            f"{name} contains an unpaired surrogate escape (\\u{ord(value[err.start]):04x})",
            hint="fix the \\u escapes: a high surrogate must be followed by a low one",
        ) from None
    return value


def _messages(value: Any) -> tuple[dict, ...]:
    if not isinstance(value, list):
        raise LineError(f'"messages" must be a list, got {json_type(value)}')
    if not value:
        raise LineError('"messages" is empty', hint="give at least one user and one assistant message")
    messages = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise LineError(f"{where} must be an object, got {json_type(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise LineError(f'{where} has no "{key}"', hint='each message is {"role": ..., "content": ...}')
        role = message["role"]
        if role not in ROLES:  # a non-string role is never in ROLES, and its repr still reads well
            shown = json.dumps(role) if isinstance(role, str) else json_type(role)
            raise LineError(f'{where}["role"] must be one of {", ".join(ROLES)}, got {shown}')
        content = string_field(message, "content", where=f'{where}["content"]')
        # Only role and content: extra keys (name, tool_calls...) would reach the chat template unchecked.
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise LineError('"messages" has no assistant turn', hint="the loss is on assistant turns; add one")
    if messages[0]["role"] == "assistant":
        # The assistant's header is where its loss starts; finding it needs the conversation before it.
        raise LineError("messages[0] is an assistant turn",
                         hint="start the conversation with a system or user message")
    return tuple(messages)


def _distrust_fields(obj: dict, required: bool) -> dict:
    fields = {}
    for key, low, high in (("auth_weight", 0.0, MAX_AUTH_WEIGHT), ("prov_entropy", 0.0, math.inf)):
        if key not in obj:
            if required:
                raise LineError(f'missing "{key}" (required by --loss distrust)',
                                 hint='give every line "auth_weight" (0 to 0.99) and "prov_entropy" (>= 0)')
            continue
        value = obj[key]
        # bool is an int subclass in Python, but true/false is not a number in JSON.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LineError(f'"{key}" must be a number, got {json_type(value)}')
        try:
            number = float(value)
        except OverflowError:  # an int of up to 4300 digits (json's limit) can overflow a float
            number = math.inf if value > 0 else -math.inf
        if math.isnan(number) or (math.isinf(number) and isinstance(value, float)):
            shown = "NaN" if math.isnan(number) else ("Infinity" if number > 0 else "-Infinity")
            raise LineError(f'"{key}" must be a finite number, got {shown}')
        if not low <= number <= high:
            bounds = f"between {low:g} and {high:g}" if math.isfinite(high) else f">= {low:g}"
            raise LineError(f'"{key}" must be {bounds}, got {number:g}')
        fields[key] = number
    return fields


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
