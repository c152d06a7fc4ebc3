"""The memory guard: real readings on this process (fresh mappings move RSS), and fake readers for the policy."""

from __future__ import annotations

import gc
import random
import subprocess
import sys
import time
from collections import namedtuple

import psutil
import pytest
from pathlib import Path
import torch
from resident_memory import resident

from memfit.guard import (
    Guard,
    MemoryLimit,
    MemorySample,
    MemorySampler,
    choose_limit,
    configure_cuda,
    cuda_alloc_conf_env,
    fit_leak,
    format_gb,
    is_out_of_memory,
    memory_report,
    read_memory,
    release_memory,
)

MB = 1024**2
GB = 1024**3


def rss() -> int:
    return read_memory().rss_bytes


class FakeReader:
    """A memory curve under test control: watched = rss_bytes; each read advances a fake clock by `tick` s."""

    def __init__(self, rss_bytes: int, tick: float = 0.1):
        self.rss_bytes = rss_bytes
        self.peak_rss_bytes = rss_bytes
        self.tick = tick
        self.now = 1000.0

    def __call__(self, device: str = "cpu") -> MemorySample:
        self.now += self.tick
        self.peak_rss_bytes = max(self.peak_rss_bytes, self.rss_bytes)
        return MemorySample(self.now, self.rss_bytes, self.peak_rss_bytes, 16 * GB)


# --- readings ----------------------------------------------------------------------------------------------


def test_read_memory_is_sane_and_follows_new_memory():
    before = read_memory()
    assert before.rss_bytes > 10 * MB
    assert before.peak_rss_bytes >= before.rss_bytes - 8 * MB  # the kernel's counters lag a little
    assert abs(before.system_available_bytes - psutil.virtual_memory().available) < 256 * MB
    assert before.cuda_reserved_bytes is None and before.watched_bytes == before.rss_bytes
    block = resident(200 * MB)
    after = read_memory()
    assert 190 * MB <= after.rss_bytes - before.rss_bytes <= 230 * MB
    assert after.peak_rss_bytes >= before.rss_bytes + 190 * MB
    assert after.time > before.time
    del block


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback of a torch without CUDA")
def test_read_memory_on_cuda_without_cuda_watches_rss():
    sample = read_memory("cuda")
    assert sample.cuda_reserved_bytes is None and sample.nvml_used_bytes is None
    assert sample.watched_bytes == sample.rss_bytes


def test_read_memory_parses_the_cuda_allocator_stats(monkeypatch):
    stats = {"allocated_bytes": {"all": {"current": 5 * GB}}, "reserved_bytes": {"all": {"current": 6 * GB,
                                                                                         "peak": 7 * GB}}}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "memory_stats_as_nested_dict", lambda index: stats if index == 1 else {})
    sample = read_memory("cuda:1")
    assert (sample.cuda_allocated_bytes, sample.cuda_reserved_bytes, sample.cuda_max_reserved_bytes) == (
        5 * GB, 6 * GB, 7 * GB)
    assert sample.watched_bytes == 6 * GB and sample.watched_high_water_bytes == 7 * GB
    assert read_memory("cuda").cuda_reserved_bytes == 0  # device 0 holds nothing yet


def test_sampler_thread_sees_a_spike_that_step_end_reads_miss():
    # Raise the OS high-water mark first, so only the thread (not getrusage) can see the smaller spike below it.
    del_me = resident(400 * MB)
    del del_me
    with MemorySampler(interval_s=0.02) as sampler:
        assert sampler.running
        baseline = sampler.take_window_peak()
        spike = resident(300 * MB)
        time.sleep(0.3)
        del spike
        step_end = rss()
        peak = sampler.take_window_peak()
    assert not sampler.running
    assert step_end < baseline + 100 * MB  # a read at the step boundary sees nothing
    assert peak >= baseline + 250 * MB
    assert read_memory().peak_rss_bytes >= baseline + 390 * MB  # the spike was indeed below the high-water mark


def test_the_sampler_counts_its_own_thread_cpu_time_and_nothing_else():
    def slow_reader(device):  # 2 ms of CPU per reading, in the sampler's thread
        started = time.thread_time()
        while time.thread_time() - started < 0.002:
            pass
        return read_memory(device)

    with MemorySampler(interval_s=0.01, reader=slow_reader) as sampler:
        started = time.thread_time()
        while time.thread_time() - started < 0.3:  # this (main) thread busy meanwhile: not the sampler's time
            pass
    # About 25 readings of 2 ms each in 0.3 s; the main thread's 0.3 s of CPU is not counted.
    assert 0.02 < sampler.thread_cpu_s < 0.2
    idle = MemorySampler(interval_s=0)
    idle.start()
    idle.stop()
    assert idle.thread_cpu_s == 0.0  # no thread, no cost


def test_a_child_process_peak_is_its_own_not_its_parents():
    # exec folds the replaced address space's RSS into getrusage's ru_maxrss; after Python's vfork that is this
    # (parent) process. A probe trial or measurement child must report only what it used.
    held = resident(800 * MB)
    code = "from memfit.guard.sampler import peak_rss_bytes; print(peak_rss_bytes())"
    child_peak = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert rss() > 800 * MB
    assert 10 * MB < child_peak < 500 * MB  # importing torch and psutil: about 220 MB
    del held


def test_window_peak_catches_a_new_high_water_mark_without_a_thread():
    sampler = MemorySampler(interval_s=0)  # no thread: only getrusage's high-water mark can tell
    baseline = sampler.take_window_peak()
    high_water = read_memory().peak_rss_bytes
    spike = resident(max(high_water - baseline, 0) + 150 * MB)  # a new record for this process
    del spike
    peak = sampler.take_window_peak()
    assert not sampler.running
    assert peak >= high_water + 100 * MB
    assert sampler.take_window_peak() < peak - 100 * MB  # the next window starts afresh


def test_rate_is_positive_while_allocating_and_flat_after():
    held = []
    with MemorySampler(interval_s=0.02) as sampler:
        started = time.monotonic()
        for _ in range(25):  # 10 MB every 20 ms: about 500 MB/s on an idle machine
            held.append(resident(10 * MB))
            time.sleep(0.02)
        allocated_rate = 25 * 10 * MB / (time.monotonic() - started)  # slower under load: what the sampler saw
        rising = sampler.rate_bytes_per_s(0.4)
        time.sleep(0.4)
        flat = sampler.rate_bytes_per_s(0.3)
    # Against the rate the loop really allocated at, not the nominal 500 MB/s: under `make test`'s load the sampler
    # once read 122 MB/s (2026-12-06) and a fixed 150 MB/s bar failed, the loop's sleeps and page faults slowed.
    assert rising > 0.5 * allocated_rate
    assert abs(flat) < 0.1 * allocated_rate
    assert MemorySampler(interval_s=0).rate_bytes_per_s() == 0.0  # fewer than 3 samples
    del held


# --- the limit ---------------------------------------------------------------------------------------------


def test_choose_limit_auto_and_explicit(monkeypatch):
    memory = namedtuple("svmem", "available")
    monkeypatch.setattr("memfit.system.psutil.virtual_memory", lambda: memory(10 * GB))
    monkeypatch.setattr("memfit.cgroup.cgroup_memory", lambda: None)  # whatever container the tests run in
    auto = choose_limit(None)
    assert auto == MemoryLimit(8 * GB, 10 * GB, auto=True, device="cpu")
    assert auto.describe() == ("No memory limit specified. Auto-detecting safe limit: 8.00 GB "
                               "(based on 10.00 GB available)")
    explicit = choose_limit(6.5)
    assert explicit.limit_bytes == int(6.5 * GB) and not explicit.auto
    assert explicit.describe() == "Memory limit: 6.50 GB (--max-memory)"
    assert choose_limit(None, fraction=0.5).limit_bytes == 5 * GB
    configure_cuda(auto)  # a CPU limit: nothing to configure, and nothing raises


def test_cuda_alloc_conf_respects_the_user(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    cuda_alloc_conf_env()
    import os

    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    cuda_alloc_conf_env()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"


def test_release_memory_frees_garbage_cycles():
    gc.disable()
    try:
        before = rss()
        cycle: list = [resident(150 * MB)]
        cycle.append(cycle)  # only the cycle collector can free this
        del cycle
        assert rss() > before + 140 * MB
        release_memory()
        assert rss() < before + 30 * MB
    finally:
        gc.enable()


# --- the guard ---------------------------------------------------------------------------------------------


def test_end_step_reports_threshold_once_then_the_limit():
    baseline = rss()
    limit = MemoryLimit(baseline + 300 * MB, 16 * GB, auto=False, device="cpu")
    threshold = (baseline + 100 * MB) / limit.limit_bytes  # crossed 100 MB above where we are
    guard = Guard(limit, threshold=threshold, interval_s=0)
    sample, events = guard.end_step(1)
    assert events == [] and not guard.stop_requested
    assert sample.window_peak_bytes >= sample.watched_bytes
    first = resident(150 * MB)
    _, events = guard.end_step(2)
    assert [event.kind for event in events] == ["threshold"]
    assert "of the limit" in events[0].message and "released caches" in events[0].message
    assert not guard.stop_requested
    second = resident(250 * MB)
    _, events = guard.end_step(3)
    assert [event.kind for event in events] == ["limit"]  # the threshold is not reported twice
    assert guard.stop_requested and "above the limit" in guard.stop_reason
    assert guard.peak_watched_bytes >= baseline + 390 * MB
    assert [step for step, _ in guard.samples] == [1, 2, 3]
    del first, second


def test_background_thread_stops_before_the_limit_when_memory_rises_fast():
    baseline = rss()
    limit = MemoryLimit(baseline + 400 * MB, 16 * GB, auto=False, device="cpu")
    held = []
    with Guard(limit, interval_s=0.02) as guard:
        # Two steps have finished (the second's peak is the baseline; the first's is warm-up), of 10 s each: the
        # rise is projected over what remains of the step, which a slow loop on a loaded machine does not use up.
        for step in (1, 2):
            guard.note_step_time(10.0)
            guard.end_step(step)
        while not guard.stop_requested and len(held) < 80:  # 10 MB a reading, every 20 ms: ~500 MB/s, 800 MB at most
            seen = guard.sampler.latest
            held.append(resident(10 * MB))
            time.sleep(0.02)
            deadline = time.monotonic() + 2.0
            # One reading per 10 MB even when a loaded machine (CI under load) starves the sampler thread, which
            # otherwise sees the rise in few, late readings and only at the limit itself.
            while guard.sampler.latest is seen and time.monotonic() < deadline:
                time.sleep(0.005)
        at_stop = rss()
        _, events = guard.end_step(3)
    assert guard.stop_requested
    assert at_stop < limit.limit_bytes  # stopped before the limit was reached
    assert "rising" in guard.stop_reason
    assert [event.kind for event in events] == ["early_stop"]
    del held


def test_the_first_steps_rise_is_not_projected():
    """Before a step has finished nothing tells the forward pass from a runaway: only the limit itself stops it."""
    reader = FakeReader(1 * GB, tick=0.05)
    limit = MemoryLimit(1 * GB + 800 * MB, 16 * GB, auto=False, device="cpu")
    guard = Guard(limit, threshold=1.0, interval_s=0, reader=reader)
    for _ in range(7):  # 2 GB/s up to 1.7 GB of 1.78: projected over any horizon, far past the limit
        reader.rss_bytes += 100 * MB
        guard.sampler.sample_now()
    assert not guard.stop_requested, guard.stop_reason
    reader.rss_bytes += 150 * MB  # over the limit
    guard.sampler.sample_now()
    assert guard.stop_requested and "above the limit" in guard.stop_reason


def test_early_stop_ignores_the_transient_every_step_repeats():
    """Each step climbs 600 MB at 3 GB/s and falls back. Projected over the step, that rise would cross the limit,
    but it stays under the earlier steps' peak: no stop. A climb past that peak is projected, and stops."""
    reader = FakeReader(1 * GB, tick=0.1)
    limit = MemoryLimit(1 * GB + 800 * MB, 16 * GB, auto=False, device="cpu")
    guard = Guard(limit, threshold=1.0, interval_s=0, reader=reader)

    def step(number: int, rises: list[int]) -> list:
        for _ in range(2):
            guard.sampler.sample_now()
        for rise in rises:
            reader.rss_bytes += rise
            guard.sampler.sample_now()
        for _ in range(3):
            guard.sampler.sample_now()
        reader.rss_bytes = 1 * GB
        guard.note_step_time(4.0)  # a 4 s step: a rise at 1 GB/s projects 3 GB further before the step ends
        return [event.kind for event in guard.end_step(number)[1]]

    # The first step (warm-up: allocator, lazy set-up) peaks at 1.1 GB and is no baseline. The second climbs to
    # 1.6 GB at 1-3 GB/s, far above it, and is not projected either: it sets the peak the later steps are held to.
    assert step(1, [100 * MB]) == []
    assert step(2, [100 * MB, 100 * MB, 100 * MB, 300 * MB]) == []
    assert step(3, [300 * MB, 300 * MB]) == []
    assert not guard.stop_requested, guard.stop_reason
    assert step(4, [300 * MB, 300 * MB, 150 * MB]) == ["early_stop"]  # 1.75 GB: new ground, rising fast
    assert "rising" in guard.stop_reason and guard.peak_watched_bytes < guard.limit.limit_bytes


def test_fit_leak_recovers_slope_and_projected_step():
    steps = list(range(10, 30))
    values = [1 * GB + 5 * MB * step for step in steps]
    fit = fit_leak(steps, values, limit_bytes=1 * GB + 5 * MB * 100)
    assert fit.bytes_per_step == pytest.approx(5 * MB)
    assert fit.r_squared == pytest.approx(1.0)
    assert (fit.first_step, fit.last_step, fit.projected_limit_step) == (10, 29, 100)
    assert fit_leak(steps[:7], values[:7], 2 * GB) is None
    flat = fit_leak(steps, [GB] * len(steps), 2 * GB)
    assert flat.bytes_per_step == 0 and flat.r_squared == 0 and flat.projected_limit_step is None


def _events_of_steps(limit_bytes, rss_of_step, steps):
    """A guard over a fake reader (2 GB at the start) whose RSS at each step end is rss_of_step(step): the events,
    until a stop."""
    reader = FakeReader(2 * GB)
    guard = Guard(MemoryLimit(limit_bytes, 16 * GB, auto=False, device="cpu"), interval_s=0, reader=reader)
    found = []
    for step in range(1, steps + 1):
        reader.rss_bytes = rss_of_step(step)
        found += guard.end_step(step)[1]
        if guard.stop_requested:
            break
    return guard, found


def test_leak_event_for_steady_growth_only():
    rng = random.Random(0)
    _, events = _events_of_steps(8 * GB, lambda step: 2 * GB + 12 * MB * step + rng.randint(-2 * MB, 2 * MB), 40)
    leaks = [event for event in events if event.kind == "leak"]
    assert len(leaks) == 1
    leak = leaks[0]
    assert leak.step == 18  # 10 warm-up steps, then the fit's 8 points
    assert leak.leak.bytes_per_step == pytest.approx(12 * MB, rel=0.05)
    expected = 1 + 6 * GB / (12 * MB)  # where 2 GB + 12 MB/step reaches 8 GB
    assert abs(leak.leak.projected_limit_step - expected) <= 3
    assert "MB/step" in leak.message and f"step {leak.leak.projected_limit_step:,}" in leak.message

    _, flat = _events_of_steps(8 * GB, lambda step: 2 * GB + rng.randint(-40 * MB, 40 * MB), 80)
    assert flat == []


def test_a_leak_is_stopped_one_step_before_it_would_cross_the_limit():
    rng = random.Random(0)
    guard, events = _events_of_steps(5 * GB, lambda step: 2 * GB + 100 * MB * step + rng.randint(-2 * MB, 2 * MB), 40)
    kinds = [(event.kind, event.step) for event in events]
    # 2 GB + 100 MB/step: step 30 is at 4.93 GB, step 31 would be past 5 GB. Stopped at 30, never over the limit.
    assert ("leak", 18) in kinds and kinds[-1] == ("early_stop", 30) and "limit" not in dict(kinds)
    assert max(event.watched_bytes for event in events) <= 5 * GB
    assert "would take step 31 past the limit" in guard.stop_reason


# --- report and OOM ----------------------------------------------------------------------------------------


def test_memory_report_lines_and_status():
    limit = MemoryLimit(28 * GB, 35 * GB, auto=True, device="cpu")
    over = MemorySample(0.0, int(28.52 * GB), int(28.52 * GB), int(4.12 * GB))
    text = memory_report(over, limit, 0.8)
    lines = text.splitlines()
    assert lines[0] == lines[2] == lines[-1] == "━" * 60 and lines[1] == "Memory Usage Report"
    for line in ("  Process RSS:       28.52 GB", "  Max RSS:           28.52 GB", "  System Available:  4.12 GB",
                 "  Limit:             28.00 GB (auto: 80% of 35.00 GB available)",
                 "  Usage:             101.9% of limit", "  Threshold:         80% (22.40 GB)",
                 "  Status:            ⚠️  OVER THRESHOLD"):
        assert line in lines
    assert "GPU" not in text

    gpu = MemorySample(0.0, 3 * GB, 4 * GB, 20 * GB, cuda_allocated_bytes=5 * GB, cuda_reserved_bytes=6 * GB,
                       cuda_max_reserved_bytes=7 * GB)
    text = memory_report(gpu, MemoryLimit(20 * GB, 40 * GB, auto=False, device="cuda"), 0.8, 7 * GB)
    assert "OVER THRESHOLD" not in text and "  Status:            OK" in text
    assert "  Limit:             20.00 GB (--max-memory)" in text
    assert "  Usage:             30.0% of limit" in text  # reserved, not RSS, on CUDA
    assert "  GPU reserved:      6.00 GB" in text and "  GPU max reserved:  7.00 GB" in text
    assert "NVML" not in text
    assert format_gb(1.234 * GB) == "1.23 GB"


def test_is_out_of_memory():
    with pytest.raises(RuntimeError) as caught:
        torch.empty(2**62, dtype=torch.uint8)
    assert is_out_of_memory(caught.value)
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    try:
        try:
            raise MemoryError()
        except MemoryError as oom:
            raise ValueError("the step failed") from oom
    except ValueError as wrapped:
        assert is_out_of_memory(wrapped)
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only the allocators' error types
    assert not is_out_of_memory(KeyboardInterrupt())


def test_proc_fields_are_read_in_bytes_and_a_missing_one_raises(tmp_path):
    from memfit.guard.sampler import _proc_bytes

    status = tmp_path / "status"
    status.write_bytes(b"Name:\tpython\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\nThreads:\t3\n")
    assert _proc_bytes(str(status), b"VmRSS:", b"VmHWM:") == [1024 * 1024, 2048 * 1024]
    with pytest.raises(ValueError):
        _proc_bytes(str(status), b"MemAvailable:")


def test_choose_limit_stays_inside_the_memory_cgroup(monkeypatch):
    from memfit.cgroup import CgroupMemory

    memory = namedtuple("svmem", "available")
    monkeypatch.setattr("memfit.system.psutil.virtual_memory", lambda: memory(20 * GB))
    # A 4 GB container using 3 GB, 0.5 GB of it reclaimable page cache: 1.5 GB left, not the machine's 20.
    cgroup = CgroupMemory(Path("/sys/fs/cgroup/job"), 4 * GB, 3 * GB, GB // 2)
    monkeypatch.setattr("memfit.cgroup.cgroup_memory", lambda: cgroup)
    auto = choose_limit(None)
    assert (auto.limit_bytes, auto.available_bytes, auto.cgroup_limit_bytes) == (int(1.2 * GB), int(1.5 * GB), 4 * GB)
    assert "inside a 4.00 GB cgroup limit" in auto.describe()
    above = choose_limit(6)
    assert "above this process's cgroup limit of 4.00 GB" in above.describe()
    assert "cgroup" not in choose_limit(3).describe()
