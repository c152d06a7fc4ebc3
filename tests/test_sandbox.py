"""The sandbox for generated code: right and wrong programs are told apart, and hostile ones (fork bomb, endless
loop, huge allocation, writes outside, network, reading the parent's secrets) are contained, classified and
reported, with the test process unharmed and nothing of theirs left running or written."""

import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from memfit.errors import UserError
from memfit.eval import sandbox
from memfit.eval.sandbox import Limits, run_python

REPO = Path(__file__).resolve().parents[1]
FAST = Limits(wall_s=5, cpu_s=3, processes=8)


@pytest.fixture
def sandboxed():
    support = sandbox.sandbox_support()
    if not support.available:
        pytest.skip(f"no sandbox on this machine: {support.reason}")


def _named(token: str, body: str) -> str:
    """A program that first renames itself (comm, inherited by its forks) so the test can find what is left."""
    return textwrap.dedent(f"""\
        import ctypes
        ctypes.CDLL(None).prctl(15, {token[:15].encode()!r}, 0, 0, 0)  # PR_SET_NAME
        """) + textwrap.dedent(body)


def _alive_named(token: str) -> list[int]:
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == token[:15]:
                    state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        alive.append(int(entry.name))
            except OSError:
                pass
    return alive


def _token() -> str:
    return "mf" + uuid.uuid4().hex[:12]


def test_a_right_program_passes_and_a_wrong_one_fails(sandboxed):
    right = run_python("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('MARK')\n", FAST, marker="MARK")
    assert (right.status, right.exit_code, right.sandboxed) == ("passed", 0, True)
    wrong = run_python("def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5, 'add is off'\nprint('MARK')\n",
                       FAST, marker="MARK")
    assert wrong.status == "failed" and "AssertionError: add is off" in wrong.reason
    early = run_python("import sys\nsys.exit(0)\nassert False\nprint('MARK')\n", FAST, marker="MARK")
    assert early.status == "failed" and "before its tests finished" in early.reason
    broken = run_python("def f(:\n", FAST, marker="MARK")
    assert broken.status == "error" and "SyntaxError" in broken.reason


def test_fork_bomb_is_held_to_the_process_limit_and_killed_whole(sandboxed):
    token = _token()
    bomb = _named(token, """\
        import os
        while True:
            try:
                if os.fork() == 0:
                    os.setsid()  # escape the process group: the pid namespace still holds it
            except OSError:
                pass
        """)
    started = time.monotonic()
    result = run_python(bomb, Limits(wall_s=1.5, cpu_s=3, processes=8))
    assert result.status == "timeout" and "wall time limit" in result.reason
    assert time.monotonic() - started < 10
    assert _alive_named(token) == []  # every fork died with the run
    assert subprocess.run(["true"]).returncode == 0  # the parent can still start processes


def test_the_process_limit_holds_inside(sandboxed):
    counting = """\
        import os, time
        children = 0
        try:
            for _ in range(200):
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                children += 1
        except OSError as error:
            print("stopped at", children, type(error).__name__)
        """
    result = run_python(textwrap.dedent(counting), Limits(wall_s=5, processes=8))
    assert result.status == "passed", result
    assert "stopped at" in result.stdout and int(result.stdout.split()[2]) <= 8


def test_endless_loop_and_sleep_are_stopped_by_cpu_and_wall_limits(sandboxed):
    spin = run_python("while True:\n    pass\n", Limits(wall_s=10, cpu_s=1))
    assert spin.status == "timeout" and "CPU time limit" in spin.reason and spin.wall_s < 5
    token = _token()
    sleeper = run_python(_named(token, "import time\ntime.sleep(60)\n"), Limits(wall_s=1))
    assert sleeper.status == "timeout" and 1 <= sleeper.wall_s < 5
    assert _alive_named(token) == []


def test_huge_allocation_is_refused_by_the_address_space_limit(sandboxed):
    result = run_python("x = bytearray(64 * 1024**3)\n", FAST)
    assert result.status == "memory" and "MemoryError" in result.reason
    growing = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))\n",
                         Limits(memory_bytes=256 * 1024**2))
    assert growing.status == "memory"


def test_writes_outside_the_temp_dir_do_not_land(sandboxed, tmp_path):
    outside_tmp = Path(f"/tmp/memfit-escape-{uuid.uuid4().hex}")
    # The repository, unless it lies under /tmp (a CI checkout may): the sandbox's own /tmp hides it there.
    on_disk = Path("/etc") if REPO.resolve().is_relative_to("/tmp") else REPO
    in_repo = on_disk / f"escape-{uuid.uuid4().hex}.txt"
    program = f"""\
        import os
        open("scratch.txt", "w").write("cwd is writable")
        open({str(outside_tmp)!r}, "w").write("x")  # the private /tmp: gone with the run
        print(os.getcwd(), os.environ["HOME"])
        open({str(in_repo)!r}, "w").write("x")
        """
    try:
        result = run_python(textwrap.dedent(program), FAST)
        assert result.status == "error" and "Read-only file system" in result.reason, result.reason
        assert result.stdout.split() == ["/tmp", "/tmp"]
        assert not outside_tmp.exists() and not in_repo.exists()
    finally:
        in_repo.unlink(missing_ok=True)
    big = run_python("open('big', 'wb').write(b'x' * (64 * 1024**2))\n", Limits(file_bytes=1024**2))
    assert big.status == "error" and "File too large" in big.reason


def test_no_network_not_even_the_parents_loopback(sandboxed):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    program = f"""\
        import socket
        for address in (("127.0.0.1", {port}), ("1.1.1.1", 53)):
            try:
                socket.create_connection(address, timeout=2)
                print("connected", address)
            except OSError as error:
                print("refused", type(error).__name__)
        socket.create_connection(("127.0.0.1", {port}), timeout=2)
        """
    result = run_python(textwrap.dedent(program), FAST)
    assert result.status == "error" and "connected" not in result.stdout
    assert result.stdout.count("refused") == 2
    with pytest.raises(BlockingIOError):
        server.accept()  # nothing ever reached the parent's listening socket
    server.close()


def test_the_child_sees_no_inherited_environment(sandboxed, monkeypatch):
    monkeypatch.setenv("MEMFIT_FAKE_SECRET", "hunter2-do-not-leak")
    program = """\
        import os
        print(sorted(os.environ))
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    print(open(f"/proc/{pid}/environ", "rb").read())
                except OSError:
                    pass
        """
    result = run_python(textwrap.dedent(program), FAST)
    assert result.status == "passed"
    assert "hunter2" not in result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == str(sorted(sandbox.ENV))


def test_a_daemon_does_not_outlive_its_run(sandboxed):
    token = _token()
    daemon = _named(token, """\
        import os, time
        if os.fork() == 0:
            os.setsid()
            time.sleep(60)
        print("parent done")
        """)
    result = run_python(daemon, FAST)
    assert result.status == "passed" and "parent done" in result.stdout
    assert _alive_named(token) == []


def test_output_is_capped(sandboxed):
    result = run_python("print('x' * 200_000)\n", Limits(output_bytes=1000))
    assert result.status == "passed"
    assert result.stdout.startswith("x" * 1000) and "more bytes not kept" in result.stdout
    assert len(result.stdout) < 1200


def test_without_unshare_runs_are_refused_unless_allowed(monkeypatch):
    monkeypatch.setattr(sandbox, "_unshare_command", lambda: None)
    sandbox.sandbox_support.cache_clear()
    try:
        assert not sandbox.sandbox_support().available
        with pytest.raises(UserError) as refused:
            sandbox.require_sandbox(allow_unsandboxed=False)
        assert "refusing to run generated code" in str(refused.value)
        assert "--allow-unsandboxed" in refused.value.one_line()
        with pytest.raises(UserError):
            run_python("print('hi')\n", FAST, sandboxed=True)
        assert sandbox.require_sandbox(allow_unsandboxed=True) is False
        monkeypatch.setenv("MEMFIT_FAKE_SECRET", "hunter2-do-not-leak")
        result = run_python("import os\nprint(sorted(os.environ))\nassert 1 + 1 == 2\nprint('MARK')\n", FAST,
                            sandboxed=False, marker="MARK")
        assert (result.status, result.sandboxed) == ("passed", False) and "MEMFIT_FAKE_SECRET" not in result.stdout
        spin = run_python("while True:\n    pass\n", Limits(wall_s=10, cpu_s=1), sandboxed=False)
        assert spin.status == "timeout"  # the rlimits still apply
    finally:
        sandbox.sandbox_support.cache_clear()


def test_a_sandbox_that_cannot_start_is_unavailable(monkeypatch):
    monkeypatch.setattr(sandbox, "_unshare_command", lambda: [sys.executable, "-c", "import sys; sys.exit(1)"])
    sandbox.sandbox_support.cache_clear()
    try:
        support = sandbox.sandbox_support()
        assert not support.available and "does not start" in support.reason
    finally:
        sandbox.sandbox_support.cache_clear()


def test_parent_is_unharmed_after_everything():
    assert os.getpid() > 0
    assert subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True).stdout == b"1\n"
