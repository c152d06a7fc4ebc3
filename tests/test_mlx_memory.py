"""MLX's memory under memfit's guard: the counters in a reading, the limits set and read back, and the guard's
policy acting on MLX readings."""

import json
import os
import random
import subprocess
import sys
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


@pytest.mark.parametrize("cache_before_mb, cache_set_mb", [(16 * 1024, 768), (32, 32)])
def test_limits_are_set_from_the_guard_limit_and_read_back(restore_limits, cache_before_mb, cache_set_mb):
    """The cache limit comes down to the part of the limit above the threshold (Metal's default is above it), and
    stays where it is when lower already (the CPU build's 32 MB: raising it only kept freed buffers resident)."""
    mx.set_cache_limit(cache_before_mb * MB)
    limits = mlx_memory.apply_limits(3 * 1024**3, threshold=0.75)
    outside = 0 if mlx_memory.metal() else limits.outside_bytes
    assert mlx_memory.memory_limit_bytes() == limits.read_back_bytes == int(3 * 1024**3 * 0.75) - outside
    assert mx.set_cache_limit(limits.cache_limit_bytes) == limits.cache_limit_bytes == cache_set_mb * MB
    assert limits.previous_cache_limit_bytes == cache_before_mb * MB
    assert limits.previous_memory_limit_bytes > 0
    text = limits.describe()
    assert f"Set MLX memory limit to {limits.memory_limit_bytes / 1024**3:.2f} GB" in text and "cache limit" in text
    assert "75% of the 3.00 GB limit" in text
    if not mlx_memory.metal():
        assert limits.wired_limit_bytes is None  # wired memory is a Metal notion: not set on a CPU
    mlx_memory.restore_limits(limits)
    assert mlx_memory.memory_limit_bytes() == limits.previous_memory_limit_bytes
    assert mx.set_cache_limit(0) == cache_before_mb * MB


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


def test_mlx_limit_is_the_arrays_share_of_the_threshold():
    GB = 1024**3
    assert mlx_memory.arrays_limit_bytes(10 * GB, 0.8, 0) == 8 * GB  # Metal: nothing beside the arrays
    assert mlx_memory.arrays_limit_bytes(10 * GB, 0.8, GB // 2) == 8 * GB - GB // 2  # a CPU: the runtime's RSS
    assert mlx_memory.arrays_limit_bytes(GB, 0.8, GB) == 1  # the runtime fills it: MLX waits for every op


def test_outside_the_arrays_is_the_rss_beside_mlx_buffers():
    """On a CPU MLX's buffers are inside the RSS: what is outside them does not grow with an array. In a fresh
    process: in a long-lived one an array can land on heap pages freed earlier and still resident, which the RSS does
    not show as growth."""
    code = ("import json, mlx.core as mx\n"
            "from memfit.mlx import memory as m\n"
            "before = m.outside_arrays_bytes()\n"
            "held = mx.ones((128 * 2**20 // 4,), dtype=mx.float32); mx.eval(held)\n"
            "print(json.dumps([m.metal(), before, m.outside_arrays_bytes(), m.read_mlx_memory().mlx_active_bytes]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    on_metal, before, after, active = json.loads(done.stdout.strip().splitlines()[-1])
    if on_metal:
        assert before == after == 0
        return
    assert active >= 128 * MB
    assert abs(after - before) < 32 * MB
    assert before > 20 * MB  # the interpreter and MLX itself


def test_under_its_memory_limit_mlx_runs_ahead_less(tmp_path):
    """Why MLX's limit is set below the guard's: a step of the tiny model with a large head (the full logits of a
    16k vocabulary, bf16, checkpointing) holds more without a limit than its need (under a 1-byte limit MLX waits for
    the running ops before each allocation), and under a limit between the two it stays below the unconstrained
    peak: MLX waits instead of allocating ahead (memfit.mlx.measure: the trainer's own step, a fresh child each, so
    the peak counter holds that step alone)."""
    from memfit.mlx.measure import measure_in_child
    from memfit.models import init_model

    init_model("tiny", tmp_path / "model", overrides={"vocab_size": 16384})
    case = dict(method="lora", dtype="bf16", batch_size=1, seq_len=256, grad_checkpointing=True, chunked_loss=False)

    def peak(limit: int) -> int:
        return measure_in_child(tmp_path / "model", case, steps=2, memory_limit_bytes=limit)["train_peak_bytes"]

    need, free = peak(1), peak(0)
    assert free > need * 1.1, (need, free)
    limited = peak(need + (free - need) // 4)
    assert need <= limited < free, (need, limited, free)


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


def test_a_runs_rss_falls_back_after_each_step(tiny_model_dir, tmp_path):
    """On a Linux CPU MLX's buffers come from malloc and the guard watches the RSS. After each step the RSS must fall
    back by most of what the step held beyond its lasting arrays: MLX's cache stays at its own 32 MB (not raised to
    a fifth of --max-memory, which kept the step's buffers resident) and glibc hands freed buffers back (memfit's
    allocator policy; under the dynamic mmap threshold the heap kept them). A fresh process, as a run starts: the
    malloc policy is process-wide. Before both changes the RSS fell by 0.00 of it (16 x 256: 691-697 MB at every
    step end and peak) and by 0.61-0.69 after."""
    words = "the quick brown fox jumps over a lazy dog while memory grows and models train".split()
    rng = random.Random(0)
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(400))}) + "\n"
                            for _ in range(60)))
    env = {key: value for key, value in os.environ.items() if key != "MEMFIT_MALLOC"}  # the default policy
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "memfit", "train", "--engine", "mlx", "--model", str(tiny_model_dir),
                           "--data", str(data), "-o", str(out), "--batch-size", "16", "--seq-len", "256",
                           "--max-steps", "2", "--max-memory", "4"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cache limit 0.03 GB" in done.stdout  # MLX's CPU default kept (a fifth of 4 GB would read 0.80 GB)
    for line in (out / "metrics.jsonl").read_text().splitlines():
        step = json.loads(line)
        transient = step["mlx_peak_bytes"] - step["mlx_active_bytes"]
        fallen = step["peak_rss_bytes"] - step["rss_bytes"]
        assert fallen > 0.4 * transient, (step["step"], fallen / transient)


def test_eval_width_is_memfits_unless_the_environment_sets_one(monkeypatch):
    monkeypatch.setenv("MLX_BFS_MAX_WIDTH", "")  # recorded, so the worker's environment comes back as it was
    monkeypatch.delenv("MLX_BFS_MAX_WIDTH")
    assert mlx_memory.set_eval_width() == "20" == os.environ["MLX_BFS_MAX_WIDTH"]
    monkeypatch.setenv("MLX_BFS_MAX_WIDTH", "1")
    assert mlx_memory.set_eval_width() == "1"


def test_run_ahead_is_bounded_by_the_estimated_need_below_the_threshold(restore_limits):
    """With the step's estimated need, MLX's limit comes down to RUN_AHEAD_HEADROOM times it (MLX waits for running
    ops past it instead of allocating ahead); a need whose bound is above the threshold's share leaves the share."""
    GB = 1024**3
    small = mlx_memory.apply_limits(3 * GB, threshold=0.8, need_bytes=100 * MB)
    assert small.bounded and small.need_bytes == 100 * MB
    assert mlx_memory.memory_limit_bytes() == small.memory_limit_bytes == int(100 * MB * mlx_memory.RUN_AHEAD_HEADROOM)
    assert "1.25x the step's estimated need" in small.describe()
    mlx_memory.restore_limits(small)
    large = mlx_memory.apply_limits(3 * GB, threshold=0.8, need_bytes=3 * GB)
    outside = 0 if mlx_memory.metal() else large.outside_bytes
    assert not large.bounded and large.memory_limit_bytes == int(3 * GB * 0.8) - outside
    assert "80% of the 3.00 GB limit" in large.describe()
    mlx_memory.restore_limits(large)


def test_a_bound_the_first_step_passed_is_set_again_from_its_peak(restore_limits):
    """An estimate below the need leaves MLX waiting before every op past the bound: after the first step the bound
    comes from the step's peak instead; a peak past the bound by what MLX had in flight (up to +16% measured) leaves
    it."""
    GB = 1024**3
    limits = mlx_memory.apply_limits(3 * GB, threshold=0.8, need_bytes=100 * MB)
    assert mlx_memory.rebound_if_missed(limits, int(limits.memory_limit_bytes * 1.2)) is None
    rebound = mlx_memory.rebound_if_missed(limits, 200 * MB)
    assert rebound is not None and rebound.bounded and rebound.need_seen
    assert mlx_memory.memory_limit_bytes() == rebound.memory_limit_bytes == int(200 * MB * 1.25)
    assert "the first step's peak" in rebound.describe()
    huge = mlx_memory.rebound_if_missed(limits, 10 * GB)  # past the threshold's share: the share, not bounded
    assert huge is not None and not huge.bounded and huge.memory_limit_bytes == limits.share_bytes
    mlx_memory.restore_limits(limits)
