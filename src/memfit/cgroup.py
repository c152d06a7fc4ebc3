"""The memory limit of this process's cgroup (a container, a Slurm job, systemd-run -p MemoryMax): Linux only.

/proc/meminfo shows the whole machine's memory, also inside a container limited to a fraction of it. There the
kernel OOM-kills the container's processes at the cgroup's limit while MemAvailable still shows plenty, so a guard
that only read MemAvailable would never stop in time. `cgroup_memory()` finds the tightest limit on the way from
this process's cgroup to the hierarchy's root (limits nest: a parent's applies to every child), and how much of it
is in use; the page cache that the kernel reclaims before it kills anything (inactive file pages) counts as free.

cgroup v2: `memory.max`, `memory.current`, `memory.stat`'s `inactive_file`. cgroup v1: `memory.limit_in_bytes`,
`memory.usage_in_bytes`, `memory.stat`'s `total_inactive_file`; "no limit" is `max` (v2) or a number near 2**63 (v1).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

_NO_LIMIT_V1 = 2**60  # v1 writes PAGE_COUNTER_MAX * page size (~2**63) for "unlimited"


@dataclass(frozen=True)
class CgroupMemory:
    path: Path  # the cgroup whose limit is the tightest
    limit_bytes: int
    usage_bytes: int  # page cache included
    reclaimable_bytes: int  # inactive file pages: dropped before the OOM killer acts

    @property
    def available_bytes(self) -> int:
        return max(0, self.limit_bytes - self.usage_bytes + self.reclaimable_bytes)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _NO_LIMIT_V1 else value


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _own_cgroups(proc_cgroup: Path) -> tuple[str | None, str | None]:
    """(v2 path, v1 memory path) of this process, from /proc/self/cgroup ("ID:controllers:path" lines)."""
    v2 = v1 = None
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def cgroup_memory(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
                  ) -> CgroupMemory | None:
    """The tightest memory limit that applies to this process, or None (no limit set, not Linux, no cgroupfs)."""
    if not sys.platform.startswith("linux") and root == Path("/sys/fs/cgroup"):
        return None
    v2, v1 = _own_cgroups(proc_cgroup)
    candidates = []
    if v1 is not None and (root / "memory").is_dir():
        candidates.append((root / "memory", v1, "memory.limit_in_bytes", "memory.usage_in_bytes",
                           "total_inactive_file"))
    if v2 is not None and (root / "cgroup.controllers").exists():
        candidates.append((root, v2, "memory.max", "memory.current", "inactive_file"))
    tightest: CgroupMemory | None = None
    for mount, own, limit_file, usage_file, inactive_key in candidates:
        # Inside a container the path may name the host's hierarchy; then the mount itself is our cgroup.
        directory = mount / own.lstrip("/")
        if not directory.is_dir():
            directory = mount
        while True:
            limit = _read_int(directory / limit_file)
            usage = _read_int(directory / usage_file)
            if limit is not None and usage is not None and (tightest is None or limit < tightest.limit_bytes):
                tightest = CgroupMemory(directory, limit, usage, _stat_value(directory / "memory.stat", inactive_key))
            if directory == mount or mount not in directory.parents:
                break
            directory = directory.parent
    return tightest
