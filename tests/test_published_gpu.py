"""benchmarks/published_gpu.py: each published case becomes a `memfit estimate` with the row's settings, and the
table reports the estimate's error against the published figure."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import published_gpu  # noqa: E402


def test_a_case_is_estimated_with_its_settings_and_its_error_reported():
    case = next(c for c in published_gpu.CASES if "QLoRA" in c.row)
    (row,) = published_gpu.compare([case])
    allocated = row["estimate_gib"]["allocated_peak_bytes"]
    assert 3 < allocated < 15  # an 8B model in 4 bits with 2 x 2048 checkpointed tokens: GiB, not bytes or GB x 1000
    assert row["error"]["allocated_peak_bytes"] == allocated / case.published_gib - 1
    table = published_gpu.markdown([row])
    assert "--method qlora" in table and f"allocated {allocated:.2f}" in table
