"""Run untrusted Python (generated code and its tests) in a child process that cannot harm the machine.

What a sandboxed run gets (see memfit/eval/_jail.py for how the inside is set up):
- new network, mount and pid namespaces (`unshare`; plus a user namespace when memfit is not root): no network
  at all (only a downed loopback), and no process of the run outlives it: the run's init is killed at the wall
  timeout and the kernel then kills every process left in its pid namespace;
- every mount read-only except a private, size-capped tmpfs on /tmp (cwd, HOME and TMPDIR), which vanishes with
  the run; /run covered by an empty tmpfs;
- as root: the program runs as uid/gid nobody (65534) with no capabilities, so RLIMIT_NPROC holds (the kernel
  does not enforce it for uid 0) and root-only files and sockets stay closed; otherwise no capabilities in its
  user namespace;
- rlimits set in the child before exec: address space, CPU seconds, file size, processes, open files, no core;
- stdin closed, a fixed environment (PATH, HOME, TMPDIR, LANG only), output captured to files and cut to a cap;
- `python -I -S -B`: the isolated interpreter, no site-packages, no user site, no bytecode written.

Where `unshare` (or the kernel features it needs) is missing, a run is refused unless the caller allows an
unsandboxed one: then only the rlimits, the wall timeout, the environment and a fresh cwd apply.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from memfit.errors import UserError

from memfit.units import MB
NOBODY = 65534
SETUP_FAILED = 125  # memfit/eval/_jail.py's exit code when the program never started
JAIL = Path(__file__).with_name("_jail.py")
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp", "TMPDIR": "/tmp"}
STATUSES = ("passed", "failed", "timeout", "memory", "killed", "error")
REFUSAL_HINT = ("pass --allow-unsandboxed to run generated code anyway, with only rlimits and a timeout (no "
                "network or filesystem isolation)")


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0  # then the whole run is killed
    cpu_s: int = 10  # RLIMIT_CPU per process
    memory_bytes: int = 1024 * MB  # RLIMIT_AS per process
    file_bytes: int = 16 * MB  # RLIMIT_FSIZE: the largest file it may write (its output files too)
    processes: int = 32  # RLIMIT_NPROC headroom over what the sandbox uid already runs
    open_files: int = 64  # RLIMIT_NOFILE
    tmp_bytes: int = 64 * MB  # size of the private /tmp
    output_bytes: int = 64 * 1024  # kept of stdout and of stderr each


@dataclass
class RunResult:
    status: str  # one of STATUSES
    reason: str  # a short human explanation
    exit_code: int | None  # the program's exit code, when it exited
    signal: str | None  # the signal that ended it, when one did
    stdout: str
    stderr: str
    wall_s: float
    sandboxed: bool

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Support:
    available: bool
    reason: str  # why not, when not available


def _unshare_command() -> list[str] | None:
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        return None
    command = [unshare, "--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc"]
    if os.geteuid() != 0:
        command[1:1] = ["--user", "--map-root-user"]
    return command


@functools.lru_cache(maxsize=1)
def sandbox_support() -> Support:
    """Whether sandboxed runs work here: checked once per process by running a one-line program in one."""
    if _unshare_command() is None:
        return Support(False, "no `unshare` (util-linux) on this machine" if sys.platform.startswith("linux")
                       else f"sandboxing needs Linux namespaces ({sys.platform} has none)")
    result = _run("import sys; sys.stdout.write('ok')", Limits(wall_s=20), sandboxed=True, marker=None)
    if result.stdout == "ok" and result.exit_code == 0:
        return Support(True, "")
    detail = (result.stderr.strip().splitlines() or [result.reason])[-1]
    return Support(False, f"the sandbox does not start here ({detail})")


def require_sandbox(allow_unsandboxed: bool) -> bool:
    """True when runs are sandboxed; False when they may not be and the caller allowed that; else UserError."""
    support = sandbox_support()
    if support.available:
        return True
    if allow_unsandboxed:
        return False
    raise UserError(f"refusing to run generated code: {support.reason}", hint=REFUSAL_HINT)


def run_python(source: str, limits: Limits = Limits(), *, sandboxed: bool = True, marker: str | None = None) -> RunResult:
    """Run `source` as a Python program under `limits`. With `marker`, it passed only if it exited 0 and printed
    the marker last (its tests, appended before the marker, ran to the end: an early `sys.exit(0)` fails)."""
    if sandboxed and not sandbox_support().available:
        raise UserError(f"refusing to run generated code: {sandbox_support().reason}", hint=REFUSAL_HINT)
    return _run(source, limits, sandboxed=sandboxed, marker=marker)


def _run(source: str, limits: Limits, *, sandboxed: bool, marker: str | None) -> RunResult:
    host = Path(tempfile.mkdtemp(prefix="memfit-sandbox-"))  # 0700: only we (and the jail's setup) read it
    try:
        return _run_in(host, source, limits, sandboxed, marker)
    finally:
        shutil.rmtree(host, ignore_errors=True)


def _run_in(host: Path, source: str, limits: Limits, sandboxed: bool, marker: str | None) -> RunResult:
    python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    root = os.geteuid() == 0
    # Unsandboxed as root, the interpreter (often under /root) may be closed to nobody: the uid stays.
    uid = NOBODY if root and sandboxed else None
    workdir = host / "work"
    workdir.mkdir()
    program = (host if sandboxed else workdir) / "main.py"
    program.write_text(source, encoding="utf-8")
    if not sandboxed and uid is not None:
        os.chown(workdir, uid, uid)
    config = {
        "program": str(program), "namespaces": sandboxed, "workdir": str(workdir), "python": python,
        "reachable": sorted({sys.base_prefix, os.path.dirname(python)}), "uid": uid, "gid": uid,
        "tmp_bytes": limits.tmp_bytes, "env": ENV,
        "limits": {"cpu_s": limits.cpu_s, "memory_bytes": limits.memory_bytes, "file_bytes": limits.file_bytes,
                   "open_files": limits.open_files,
                   "processes": _processes_of(NOBODY if uid is not None else os.getuid()) + limits.processes},
    }
    (host / "config.json").write_text(json.dumps(config))
    command = [python, "-I", "-S", "-B", str(JAIL), str(host / "config.json")]
    if sandboxed:
        command = [*_unshare_command(), "--", *command]
    out_path, err_path = host / "stdout", host / "stderr"
    started = time.monotonic()
    timed_out = False
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=ENV,
                                   cwd=str(host), start_new_session=True, close_fds=True)
        try:
            returncode = process.wait(timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            # Kill the run's init (unshare's child) first: unshare's wait for it returns only once the kernel
            # has killed and reaped every process of its pid namespace, so after this nothing of the run is left.
            for child in _children(process.pid):
                _kill(child)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        finally:
            _kill_group(process.pid)  # also after a normal end: forks of an unsandboxed run may linger
            returncode = process.wait()
    wall_s = time.monotonic() - started
    stdout, stdout_tail = _read_capped(out_path, limits.output_bytes)
    stderr, _ = _read_capped(err_path, limits.output_bytes)
    status, reason, exit_code, signame = classify(returncode, timed_out, stdout_tail, stderr, marker, limits)
    return RunResult(status, reason, exit_code, signame, stdout, stderr, round(wall_s, 3), sandboxed)


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc: no psutil in this path)."""
    children = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as handle:
                    fields = handle.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.append(int(entry.name))
    return children


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _processes_of(uid: int) -> int:
    """How many processes `uid` runs now (RLIMIT_NPROC counts them all, not just this run's)."""
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                count += entry.stat().st_uid == uid
            except OSError:
                pass
    return count


def _read_capped(path: Path, cap: int) -> tuple[str, str]:
    """(the first `cap` bytes, with a note when cut; the last 4 KB, where the marker would be)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(cap)
        handle.seek(max(0, size - 4096))
        tail = handle.read()
    text = head.decode("utf-8", "replace")
    if size > cap:
        text += f"\n[... {size - cap:,} more bytes not kept]"
    return text, tail.decode("utf-8", "replace")


_SIGNAL_REASONS = {
    "SIGXCPU": "CPU time limit", "SIGXFSZ": "file size limit", "SIGSEGV": "segmentation fault",
    "SIGKILL": "killed", "SIGABRT": "aborted",
}


def classify(returncode: int, timed_out: bool, stdout_tail: str, stderr: str, marker: str | None,
             limits: Limits) -> tuple[str, str, int | None, str | None]:
    """(status, reason, exit code, signal name) of one run."""
    last_error = _last_exception(stderr)
    if timed_out:
        return "timeout", f"wall time limit {limits.wall_s:g} s: the run and its processes were killed", None, None
    if returncode < 0 or returncode > 128:
        number = -returncode if returncode < 0 else returncode - 128
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        if name == "SIGXCPU" or (name == "SIGKILL" and "CPU" in stderr):
            return "timeout", f"CPU time limit {limits.cpu_s} s", None, name
        return "killed", f"{_SIGNAL_REASONS.get(name, 'killed by ' + name)} ({name})", None, name
    if returncode == SETUP_FAILED and "memfit-sandbox:" in stderr:
        line = next(line for line in stderr.splitlines() if line.startswith("memfit-sandbox:"))
        return "error", line.removeprefix("memfit-sandbox: "), None, None
    if last_error.startswith("MemoryError"):
        return "memory", f"MemoryError (address space limit {limits.memory_bytes // MB} MB)", returncode, None
    if returncode == 0:
        if marker is None or stdout_tail.rstrip().endswith(marker):
            return "passed", "all tests passed" if marker else "exited 0", 0, None
        return "failed", "exited 0 before its tests finished", 0, None
    if last_error.startswith("AssertionError"):
        return "failed", _short(last_error) or "AssertionError", returncode, None
    return "error", _short(last_error) or f"exit code {returncode}", returncode, None


def _last_exception(stderr: str) -> str:
    """The exception line a Python traceback ends with ("ValueError: ..."), or ''."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if not lines or not any(line.startswith("Traceback") for line in lines) and "Error" not in lines[-1]:
        return ""
    return lines[-1].strip()


def _short(text: str, width: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
