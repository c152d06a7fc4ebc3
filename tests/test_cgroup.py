"""memfit.cgroup on fake cgroup hierarchies (v1 and v2) and on this machine."""

from pathlib import Path

from memfit.cgroup import cgroup_memory

GB = 1024**3


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v2_takes_the_tightest_limit_on_the_way_to_the_root(tmp_path):
    root = tmp_path / "cgroup"
    _write(root / "cgroup.controllers", "cpu memory\n")
    _write(root / "user.slice" / "memory.max", f"{8 * GB}\n")
    _write(root / "user.slice" / "memory.current", f"{5 * GB}\n")
    _write(root / "user.slice" / "memory.stat", f"anon 1\ninactive_file {GB}\n")
    _write(root / "user.slice" / "job" / "memory.max", "max\n")  # no limit of its own: the parent's applies
    _write(root / "user.slice" / "job" / "memory.current", f"{2 * GB}\n")
    proc = tmp_path / "proc_cgroup"
    _write(proc, "0::/user.slice/job\n")
    found = cgroup_memory(root, proc)
    assert found is not None and found.path == root / "user.slice"
    assert (found.limit_bytes, found.usage_bytes, found.reclaimable_bytes) == (8 * GB, 5 * GB, GB)
    assert found.available_bytes == 4 * GB  # 8 - 5 + the reclaimable page cache


def test_v1_reads_the_memory_controller_and_ignores_unlimited(tmp_path):
    root = tmp_path / "cgroup"
    memory = root / "memory"
    _write(memory / "memory.limit_in_bytes", "9223372036854771712\n")  # the root: unlimited
    _write(memory / "memory.usage_in_bytes", f"{GB}\n")
    _write(memory / "docker" / "abc" / "memory.limit_in_bytes", f"{2 * GB}\n")
    _write(memory / "docker" / "abc" / "memory.usage_in_bytes", f"{GB // 2}\n")
    _write(memory / "docker" / "abc" / "memory.stat", "cache 5\ntotal_inactive_file 0\n")
    proc = tmp_path / "proc_cgroup"
    _write(proc, "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    found = cgroup_memory(root, proc)
    assert found is not None and (found.limit_bytes, found.available_bytes) == (2 * GB, int(1.5 * GB))

    _write(memory / "docker" / "abc" / "memory.limit_in_bytes", "9223372036854771712\n")
    assert cgroup_memory(root, proc) is None  # no limit anywhere: MemAvailable alone decides


def test_a_container_whose_path_names_the_host_hierarchy_reads_the_mount_itself(tmp_path):
    root = tmp_path / "cgroup"
    _write(root / "cgroup.controllers", "memory\n")
    _write(root / "memory.max", f"{3 * GB}\n")
    _write(root / "memory.current", f"{GB}\n")
    proc = tmp_path / "proc_cgroup"
    _write(proc, "0::/kubepods/burstable/pod123/abc\n")  # not under this mount namespace's root
    found = cgroup_memory(root, proc)
    assert found is not None and found.limit_bytes == 3 * GB


def test_nothing_to_read_is_none(tmp_path):
    assert cgroup_memory(tmp_path / "nothing", tmp_path / "no_proc_file") is None


def test_this_machine_reads_without_error():
    found = cgroup_memory()
    assert found is None or 0 < found.limit_bytes and found.available_bytes <= found.limit_bytes + found.reclaimable_bytes
