"""Code tasks: JSONL lines with a `prompt` and Python `tests`; the model's completion plus the tests make a
program, run in the sandbox (memfit.eval.sandbox); pass@1 is the share of tasks whose program passes.

A line: {"prompt": "...", "tests": "assert f(2) == 4", "id": "optional", "prompt_in_program": false}.
- The program is the completion's code, then the tests, then a line printing a per-run marker: a task passes only
  when the program exits 0 *after* printing it (a completion that calls `sys.exit(0)` early does not pass).
- The completion's code is its first fenced ```python block when it has one (chat models answer that way),
  else the whole completion.
- `"prompt_in_program": true` puts the prompt before the completion (HumanEval-style prompts that end inside
  a function the completion continues).
Every line is checked before any generation; a bad line is one `file:line: what is wrong` error.
"""

from __future__ import annotations

import json
import re
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# The data module's line reader and checks, so code-task files fail the way training files do.
from memfit.data.jsonl import LineError, json_object, json_type, read_lines, string_field
from memfit.errors import UserError
from memfit.eval.sandbox import STATUSES, Limits, RunResult, run_python

TASK_HINT = 'each line needs "prompt" and "tests" (Python code that asserts on the completion)'
_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class CodeTask:
    line: int
    task_id: str
    prompt: str
    tests: str
    prompt_in_program: bool = False


def is_code_task_file(path: str | Path) -> bool:
    """Whether the file's first non-blank line is a JSON object with "tests" (bad files are left to the readers,
    which report them properly)."""
    try:
        with Path(path).open("rb") as handle:
            for raw in handle:
                text = raw.decode("utf-8", "replace").lstrip("\ufeff")
                if text.strip():
                    obj = json.loads(text)
                    return isinstance(obj, dict) and "tests" in obj
    except (OSError, ValueError, RecursionError):
        return False
    return False


def read_tasks(path: str | Path) -> list[CodeTask]:
    path = Path(path)
    tasks, saw_lines = read_lines(path, _parse)
    if not tasks:
        why = "only blank lines" if saw_lines else "the file is empty"
        raise UserError(f"{path}: no code tasks ({why})", hint=f"add one JSON object per line; {TASK_HINT}")
    seen: dict[str, int] = {}
    for task in tasks:
        if task.task_id in seen:
            raise UserError(f"{path}:{task.line}: id {task.task_id!r} is used by line {seen[task.task_id]} too",
                            hint="give every task its own id")
        seen[task.task_id] = task.line
    return tasks


def _parse(text: str, number: int) -> CodeTask:
    obj = json_object(text, TASK_HINT)
    for key in ("prompt", "tests"):
        if key not in obj:
            raise LineError(f'missing "{key}" (a code-task file: line 1 or this line has "tests")', hint=TASK_HINT)
    prompt, tests = string_field(obj, "prompt"), string_field(obj, "tests")
    try:
        compile(tests, f"line {number} tests", "exec")  # compiling runs nothing
    except SyntaxError as err:
        raise LineError(f'"tests" is not valid Python ({err.msg}, line {err.lineno} of the tests)') from None
    except ValueError:  # a NUL byte
        raise LineError('"tests" is not valid Python (it contains a NUL character)') from None
    task_id = obj.get("id", number)
    if isinstance(task_id, bool) or not isinstance(task_id, (str, int)):
        raise LineError(f'"id" must be a string or an integer, got {json_type(task_id)}')
    in_program = obj.get("prompt_in_program", False)
    if not isinstance(in_program, bool):
        raise LineError(f'"prompt_in_program" must be true or false, got {json_type(in_program)}')
    return CodeTask(number, str(task_id), prompt, tests, in_program)


def extract_code(completion: str) -> str:
    match = _FENCE.search(completion)
    return match.group(1) if match else completion


def build_program(task: CodeTask, completion: str, marker: str) -> str:
    code = extract_code(completion)
    if task.prompt_in_program:
        code = task.prompt + code
    return f"{code}\n\n{task.tests}\n\nprint({marker!r})\n"


@dataclass
class TaskResult:
    task: CodeTask
    completion: str
    run: RunResult

    def to_dict(self) -> dict:
        return {"id": self.task.task_id, "line": self.task.line, "status": self.run.status,
                "passed": self.run.status == "passed", "reason": self.run.reason, "completion": self.completion,
                "exit_code": self.run.exit_code, "signal": self.run.signal, "wall_s": self.run.wall_s,
                "sandboxed": self.run.sandboxed, "stdout": self.run.stdout, "stderr": self.run.stderr}


def run_tasks(tasks: list[CodeTask], completions: list[str], limits: Limits, *, sandboxed: bool,
              on_result: Callable[[int, TaskResult], None] | None = None) -> list[TaskResult]:
    """Each task's program in its own sandboxed run, one after another."""
    marker = f"memfit-tests-finished-{secrets.token_hex(8)}"
    results = []
    for index, (task, completion) in enumerate(zip(tasks, completions, strict=True), 1):
        run = run_python(build_program(task, completion, marker), limits, sandboxed=sandboxed, marker=marker)
        result = TaskResult(task, completion, run)
        results.append(result)
        if on_result is not None:
            on_result(index, result)
    return results


def pass_at_1(results: list[TaskResult]) -> float:
    """One sample per task: pass@1 is the passed share (the unbiased estimator with n = 1)."""
    return sum(result.run.status == "passed" for result in results) / max(len(results), 1)


def status_counts(results: list[TaskResult]) -> dict[str, int]:
    counts = Counter(result.run.status for result in results)
    return {status: counts.get(status, 0) for status in STATUSES}
