"""Compare this venv with the lock (constraints.txt), or write the lock from it.

    python tools/lock.py constraints.txt                # exit 1 when a locked package has another version here
    python tools/lock.py constraints.txt --report-only  # say what differs from the lock, exit 0 (make test-latest)
    python tools/lock.py constraints.txt --write        # this venv's versions become the lock (make lock)

Versions are compared as pip compares them: a local label (`2.13.0+cpu`) is not part of the pin, so the lock's
`torch==2.13.0` holds a CPU or a CUDA build.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

SELF = "memfit"


def read_lock(path: Path) -> tuple[list[str], dict[str, str]]:
    """The lock's comment header and its pins (canonical name -> version)."""
    header, pins = [], {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            header.append(line)
            continue
        name, _, version = line.partition("==")
        pins[canonicalize_name(name)] = version.strip()
    return header, pins


def installed() -> dict[str, tuple[str, str]]:
    """canonical name -> (name as published, version without its local label)."""
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[canonicalize_name(name)] = (name, Version(dist.version).public)
    found.pop(SELF, None)
    return found


def differences(pins: dict[str, str], here: dict[str, tuple[str, str]]) -> list[str]:
    lines = []
    for key, version in sorted(pins.items()):
        if key not in here:
            lines.append(f"{key}: locked {version}, not installed")
        elif Version(here[key][1]) != Version(version):
            lines.append(f"{key}: locked {version}, installed {here[key][1]}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", type=Path)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--report-only", action="store_true")
    mode.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    header, pins = read_lock(args.lock)
    here = installed()
    if args.write:
        # setuptools and wheel come with the venv, not with memfit: pip freeze leaves them out too.
        keep = {key: value for key, value in here.items() if key not in {"setuptools", "wheel"}}
        body = [f"{name}=={version}" for name, version in sorted(keep.values(), key=lambda item: item[0].lower())]
        args.lock.write_text("\n".join([*header, *body]) + "\n")
        print(f"{args.lock}: {len(body)} pins written from {sys.prefix}")
        return 0
    diff = differences(pins, here)
    if args.report_only:
        print(f"against {args.lock}: " + ("the same versions" if not diff else f"{len(diff)} differ"))
        for line in diff:
            print(f"  {line}")
        return 0
    if diff:
        print(f"{sys.prefix} does not match {args.lock} ({len(diff)} differ; `make clean install` rebuilds it):",
              file=sys.stderr)
        for line in diff:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"{sys.prefix} matches {args.lock} ({len(pins)} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
