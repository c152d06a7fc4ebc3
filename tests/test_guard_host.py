"""Host RAM watched beside a GPU (issue 20 item 4): a fake device reader plays the GPU's allocator, the host side is
this process's real RSS (a fresh mapping touched page by page) and the machine's real available memory."""

from __future__ import annotations

import json
import time
from collections import namedtuple
from dataclasses import replace

import pytest

from resident_memory import resident

from memfit.guard import Guard, HostLimit, MemoryLimit, choose_host_limit, read_memory, watches_host
from memfit.guard.policy import DEVICE, HOST_AVAILABLE, HOST_RSS, host_floor_bytes

MB = 1024**2
GB = 1024**3


def rss() -> int:
    return read_memory("cpu").rss_bytes


class FakeGpu:
    """The GPU side of a reading under test control (the allocator's reserved bytes), the rest read for real."""

    def __init__(self, reserved_bytes: int):
        self.reserved_bytes = reserved_bytes
        self.peak_bytes = reserved_bytes

    def __call__(self, device: str = "cuda") -> object:
        self.peak_bytes = max(self.peak_bytes, self.reserved_bytes)
        return replace(read_memory("cpu"), cuda_allocated_bytes=self.reserved_bytes,
                       cuda_reserved_bytes=self.reserved_bytes, cuda_max_reserved_bytes=self.peak_bytes)


def gpu_guard(host_rss_limit: int, floor_bytes: int = 0, interval_s: float = 0.0,
              device_limit: int = 10 * GB, gpu: FakeGpu | None = None) -> tuple[Guard, FakeGpu]:
    gpu = gpu or FakeGpu(1 * GB)
    limit = MemoryLimit(device_limit, 80 * GB, auto=False, device="cuda")
    host = HostLimit(MemoryLimit(host_rss_limit, 16 * GB, auto=False, device="cpu"), floor_bytes, 32 * GB)
    return Guard(limit, interval_s=interval_s, reader=gpu, host=host), gpu


def test_host_rss_over_its_limit_stops_a_gpu_run_once_and_names_the_host():
    guard, gpu = gpu_guard(rss() + 150 * MB)
    sample, events = guard.end_step(1)
    assert events == [] and not guard.stop_requested
    assert sample.watched_bytes == 1 * GB  # the guard's device figure is the GPU's, not RSS
    held = resident(300 * MB)
    sample, events = guard.end_step(2)
    assert [(event.kind, event.limit) for event in events] == [("limit", HOST_RSS)]
    assert events[0].message.startswith("Stopping: host RAM above its limit: process RSS")
    assert events[0].watched_bytes == guard.peak_host_rss_bytes >= sample.rss_bytes
    assert guard.stop_requested and guard.stop_limit == HOST_RSS
    assert "--max-host-memory" in guard.stop_reason
    # The device side saw nothing: no threshold, no device limit, and the next step end does not say it again.
    assert guard.peak_watched_bytes == 1 * GB
    _, events = guard.end_step(3)
    assert events == []
    del held


def test_the_thread_sees_host_rss_cross_inside_a_step_and_the_step_end_reports_it_once():
    guard, _ = gpu_guard(rss() + 200 * MB, interval_s=0.02)
    held = []
    with guard:
        guard.end_step(1)
        deadline = time.monotonic() + 30
        while not guard.stop_requested and time.monotonic() < deadline:
            held.append(resident(20 * MB))
            time.sleep(0.03)
        assert guard.stop_requested and guard.stop_limit == HOST_RSS
        stopped_at = sum(map(len, held))
        _, events = guard.end_step(2)
    # Stopped by the thread within a few allocations of the limit, reported as the host's limit (not an early stop).
    assert stopped_at <= 300 * MB
    assert [(event.kind, event.limit) for event in events] == [("limit", HOST_RSS)]
    del held


def test_available_memory_under_the_floor_stops_with_its_own_message():
    available = read_memory("cpu").system_available_bytes
    # The floor above what this machine really has available: the real reading is under it.
    guard, _ = gpu_guard(rss() + 4 * GB, floor_bytes=available + 2 * GB)
    _, events = guard.end_step(1)
    assert [(event.kind, event.limit) for event in events] == [("limit", HOST_AVAILABLE)]
    assert "host RAM running out" in events[0].message and "available on this machine" in events[0].message
    assert guard.stop_limit == HOST_AVAILABLE
    assert guard.min_system_available_bytes is not None and guard.min_system_available_bytes < available + 2 * GB


def test_the_device_limit_on_a_gpu_says_gpu_memory_and_leaves_the_host_alone():
    guard, gpu = gpu_guard(rss() + 4 * GB, device_limit=2 * GB)
    guard.end_step(1)
    gpu.reserved_bytes = 3 * GB
    _, events = guard.end_step(2)
    assert [(event.kind, event.limit) for event in events] == [("limit", DEVICE), ("threshold", DEVICE)]
    limit_event = events[0]
    assert limit_event.message.startswith("GPU memory above the limit")
    assert guard.stop_limit == DEVICE and "GPU memory above the limit" in guard.stop_reason


def test_both_limits_crossed_keep_the_first_reason_and_report_each_once():
    guard, gpu = gpu_guard(rss() + 100 * MB, device_limit=2 * GB)
    guard.end_step(1)
    gpu.reserved_bytes = 3 * GB
    held = resident(200 * MB)
    _, events = guard.end_step(2)
    assert [(event.kind, event.limit) for event in events] == [("limit", DEVICE), ("limit", HOST_RSS),
                                                                ("threshold", DEVICE)]
    assert guard.stop_limit == DEVICE  # the first stop's reason is the run's
    _, events = guard.end_step(3)
    assert [event.kind for event in events] == ["limit"] and events[0].limit == DEVICE  # the device's rule, as before
    del held


def test_a_cpu_guard_has_no_host_watch():
    assert watches_host("cuda") and watches_host("cuda:1")
    assert not watches_host("cpu") and not watches_host("mps")
    guard = Guard(MemoryLimit(rss() + 4 * GB, 16 * GB, auto=False, device="cpu"), interval_s=0)
    _, events = guard.end_step(1)
    assert events == [] and guard.host is None and guard.peak_host_rss_bytes == 0


def test_the_floor_is_five_percent_of_ram_within_its_bounds():
    assert host_floor_bytes(64 * GB, 60 * GB) == int(3.2 * GB)
    assert host_floor_bytes(4 * GB, 3 * GB) == 512 * MB  # 5% of 4 GB is 205 MB: the 512 MiB minimum
    assert host_floor_bytes(2048 * GB, 1900 * GB) == 4 * GB  # a big host: capped
    # A machine that starts with less than twice the floor available: half of what it has, or the run stops at once.
    assert host_floor_bytes(64 * GB, 4 * GB) == 2 * GB


def test_choose_host_limit_is_the_cpu_limit_and_honours_the_cgroup(monkeypatch):
    from pathlib import Path

    from memfit.cgroup import CgroupMemory

    memory = namedtuple("svmem", "available total")
    monkeypatch.setattr("memfit.system.psutil.virtual_memory", lambda: memory(20 * GB, 32 * GB))
    monkeypatch.setattr("memfit.cgroup.cgroup_memory", lambda: None)
    auto = choose_host_limit(None)
    assert (auto.rss.limit_bytes, auto.rss.auto, auto.rss.device) == (16 * GB, True, "cpu")
    assert auto.floor_bytes == int(1.6 * GB) and auto.total_bytes == 32 * GB
    assert auto.describe() == ("Host RAM limit: 16.00 GB process RSS (auto: 80% of 20.00 GB available); stop when "
                               "the machine has less than 1.60 GB available")
    given = choose_host_limit(6, fraction=0.4)
    assert given.rss.limit_bytes == 6 * GB and not given.rss.auto and "(--max-host-memory)" in given.describe()
    shared = choose_host_limit(None, fraction=0.4)  # 2 ranks on the machine: 0.8 / 2 each
    assert shared.rss.limit_bytes == 8 * GB and "(auto: 40% of 20.00 GB available)" in shared.describe()
    cgroup = CgroupMemory(Path("/sys/fs/cgroup/job"), 8 * GB, 5 * GB, 0)
    monkeypatch.setattr("memfit.cgroup.cgroup_memory", lambda: cgroup)
    contained = choose_host_limit(None)
    assert contained.rss.limit_bytes == int(2.4 * GB)  # 80% of the 3 GB the container has left
    assert "inside a 8.00 GB cgroup limit" in contained.describe()


def test_a_guard_event_keeps_its_limit_through_the_event_record():
    from memfit.events import GuardNotice

    record = GuardNotice("limit", 3, 5 * GB, "Stopping: host RAM above its limit", HOST_RSS).to_dict()
    assert json.loads(json.dumps(record))["limit"] == "host"


def test_the_memory_report_shows_the_host_limits_beside_the_gpu():
    from memfit.guard import MemorySample, memory_report

    sample = MemorySample(0.0, 3 * GB, 4 * GB, 20 * GB, cuda_allocated_bytes=5 * GB, cuda_reserved_bytes=6 * GB,
                          cuda_max_reserved_bytes=7 * GB)
    limit = MemoryLimit(8 * GB, 80 * GB, auto=False, device="cuda")
    host = HostLimit(MemoryLimit(4 * GB, 16 * GB, auto=False, device="cpu"), GB, 32 * GB)
    text = memory_report(sample, limit, 0.8, 6 * GB, host)
    assert "Host RSS limit:    4.00 GB (--max-host-memory; RSS at 75%)" in text
    assert "Host floor:        1.00 GB available" in text
    assert "Host" not in memory_report(sample, limit, 0.8, 6 * GB)


def test_the_guard_watches_every_save_on_a_fake_gpu(tiny_model_dir, tmp_path, monkeypatch):
    """The guard's thread runs from before loading until after the last checkpoint and final/ are written (it stops
    in Trainer._finish after them): a save's host RAM is watched like a step's. Here the run is guarded as on a GPU
    (memfit.faults `fake_gpu@MB`), so the host limits are in force during the saves too."""
    from importlib import resources
    from pathlib import Path

    from memfit import faults
    from memfit.config import TrainConfig
    from memfit.events import CheckpointSaved
    from memfit.train import TrainJob
    from memfit.train.loop import Trainer

    monkeypatch.setenv(faults.ENV, "fake_gpu@100")
    faults._faults.cache_clear()
    watched = []

    def on_event(event):
        if isinstance(event, CheckpointSaved):
            guard = trainer.guard
            watched.append((event.reason, guard.sampler.running, guard.host is not None, guard.stop_requested))

    config = TrainConfig(seq_len=64, batch_size=4, max_steps=4, save_every=2, memory_sample_interval=0.05)
    job = TrainJob(model=str(tiny_model_dir), data=Path(str(resources.files("memfit") / "data/demo.jsonl")),
                   output_dir=tmp_path / "run", device="cpu")
    trainer = Trainer(job, config, on_event)
    try:
        trainer.setup()
        result = trainer.run()
    finally:
        trainer.guard.stop()
    assert result.exit_code == 0 and (tmp_path / "run" / "final").is_dir()
    assert watched == [("periodic", True, True, False), ("end", True, True, False)]
    assert trainer.guard.peak_host_rss_bytes > 0 and trainer.guard.min_system_available_bytes > 0
