"""MLX's memory under memfit's guard: the counters in a reading, the limits set and read back, and the guard's
policy acting on MLX readings."""

from dataclasses import replace

import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from memfit.guard import Guard, MemoryLimit  # noqa: E402
from memfit.mlx import memory as mlx_memory  # noqa: E402

MB = 1024**2


@pytest.fixture
def restore_limits():
    before_memory = mlx_memory.memory_limit_bytes()
    before_cache = mx.set_cache_limit(0)
    mx.set_cache_limit(before_cache)
    yield
    mx.set_memory_limit(before_memory)
    mx.set_cache_limit(before_cache)


def test_a_reading_holds_mlx_counters_and_follows_an_allocation():
    before = mlx_memory.read_mlx_memory()
    held = mx.ones((64 * MB // 4,), dtype=mx.float32)
    mx.eval(held)
    after = mlx_memory.read_mlx_memory()
    assert after.mlx_active_bytes - before.mlx_active_bytes >= 63 * MB
    assert after.mlx_peak_bytes >= after.mlx_active_bytes
    assert after.watched_bytes >= max(after.rss_bytes, after.mlx_active_bytes)
    assert after.system_available_bytes > 0
    del held


def test_limits_are_set_from_the_guard_limit_and_read_back(restore_limits):
    limits = mlx_memory.apply_limits(3 * 1024**3, threshold=0.75)
    assert mlx_memory.memory_limit_bytes() == limits.read_back_bytes == 3 * 1024**3
    assert mx.set_cache_limit(limits.cache_limit_bytes) == limits.cache_limit_bytes == int(3 * 1024**3 * 0.25)
    assert limits.previous_memory_limit_bytes > 0
    text = limits.describe()
    assert "Set MLX memory limit to 3.00 GB" in text and "cache limit" in text
    if not mlx_memory.metal():
        assert limits.wired_limit_bytes is None  # wired memory is a Metal notion: not set on a CPU
    mlx_memory.restore_limits(limits)
    assert mlx_memory.memory_limit_bytes() == limits.previous_memory_limit_bytes


@pytest.mark.parametrize("working_set_gb, expected_gb", [(48, 3), (2, 2)])
def test_on_metal_the_wired_limit_is_the_limit_at_most_the_working_set(restore_limits, monkeypatch, working_set_gb,
                                                                        expected_gb):
    """No Mac here: Metal's recommended working set and its set_wired_limit are stood in for, MLX's memory and cache
    limits are set for real. The wired limit is the guard's limit, capped at what macOS lets the GPU keep wired,
    and restore_limits puts the previous one back."""
    GB = 1024**3
    wired_calls = []

    def set_wired_limit(value):
        wired_calls.append(value)
        return 7 * GB if len(wired_calls) == 1 else wired_calls[-2]

    real_setter = mlx_memory._setter
    monkeypatch.setattr(mlx_memory, "recommended_working_set_bytes", lambda: working_set_gb * GB)
    monkeypatch.setattr(mlx_memory, "_setter",
                        lambda name: set_wired_limit if name == "set_wired_limit" else real_setter(name))
    limits = mlx_memory.apply_limits(3 * GB, threshold=0.8)
    assert limits.wired_limit_bytes == wired_calls[0] == expected_gb * GB
    assert limits.previous_wired_limit_bytes == 7 * GB
    assert f"wired limit {expected_gb:.2f} GB" in limits.describe()
    mlx_memory.restore_limits(limits)
    assert wired_calls[-1] == 7 * GB


def test_the_guard_policy_runs_on_mlx_readings():
    """The torch engine's guard, given MLX readings: MLX memory the RSS does not show (Metal buffers) still counts,
    the step's peak goes over the limit, the guard asks to stop."""
    base = mlx_memory.read_mlx_memory()
    # Twice this process's RSS: step 1 sits at half the limit, under the 80% warning whatever RSS the test process
    # has gathered by now (the whole suite leaves it near 0.8 GB).
    limit = MemoryLimit(2 * base.rss_bytes + 200 * MB, 10 * 1024**3, auto=False, device="cpu")
    readings = [replace(base, mlx_active_bytes=0, mlx_cache_bytes=0),  # step 1 ends below the limit
                replace(base, mlx_active_bytes=limit.limit_bytes + 100 * MB, mlx_cache_bytes=0)]  # step 2: above

    def reader(device):
        return readings.pop(0) if len(readings) > 1 else readings[0]

    guard = Guard(limit, interval_s=0, reader=reader)
    guard.start()
    _, events = guard.end_step(1)
    assert not guard.stop_requested and not events
    sample, events = guard.end_step(2)
    assert guard.stop_requested and [event.kind for event in events][:1] == ["limit"]
    assert isinstance(sample, mlx_memory.MlxMemorySample) and sample.window_peak_bytes > limit.limit_bytes
    report = mlx_memory.report_lines(sample)
    assert "MLX active:" in report and "MLX cache:" in report
