"""tools/lock.py: the lock CI installs from, checked against a venv and written from one."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("lock", ROOT / "tools" / "lock.py")
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)


def test_differences_name_each_package_off_the_lock():
    here = {"torch": ("torch", "2.13.0"), "transformers": ("transformers", "5.25.0")}
    pins = {"torch": "2.13.0", "transformers": "5.24.0", "peft": "0.21.2"}
    assert lock.differences(pins, here) == ["peft: locked 0.21.2, not installed",
                                            "transformers: locked 5.24.0, installed 5.25.0"]


def test_this_venv_matches_the_committed_lock():
    """make install checks the same: the suite runs on the versions CI installs."""
    _, pins = lock.read_lock(ROOT / "constraints.txt")
    assert lock.differences(pins, lock.installed()) == []
    assert "transformers" in pins and "torch" in pins


def test_write_keeps_the_header_and_pins_what_is_installed(tmp_path):
    path = tmp_path / "constraints.txt"
    path.write_text("# header line\nonly-in-old-lock==1.0\n")
    assert lock.main([str(path), "--write"]) == 0
    header, pins = lock.read_lock(path)
    assert header == ["# header line"]
    assert "only-in-old-lock" not in pins and "memfit" not in pins
    assert pins["torch"] == lock.installed()["torch"][1]
    assert lock.main([str(path)]) == 0  # the venv it was written from matches it
