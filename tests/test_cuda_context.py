"""The CUDA context measured with NVML (memfit.cuda_context): no GPU here, so a fake NVML reader (a parameter, not a
patched library) plays the driver's figures and a fake CUDA start plays torch's allocator."""

from __future__ import annotations

import os

import pytest

from memfit import cuda_context
from memfit.cuda_context import context_bytes, context_from, measure_and_record, measure_context, recorded

MB = 1024**2


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path / "cache"))  # each test starts with no recorded measurement


class FakeNvml:
    """A device with `others` bytes in use by other processes; this process uses `process` once CUDA started
    (None: NVML lists no processes, as in some containers)."""

    def __init__(self, others: int, process: int | None, listed: bool = True):
        self.others, self.process, self.listed = others, process, listed
        self.started = False
        self.pids: list[int] = []

    def gpu_name(self, index: int) -> str:
        return f"Fake H200 #{index}"

    def device_used_bytes(self, index: int) -> int:
        return self.others + (self.process if self.started and self.process else 0)

    def process_used_bytes(self, index: int, pid: int) -> int | None:
        self.pids.append(pid)
        return self.process if self.listed and self.started else None


def starting(nvml: FakeNvml, reserved: int):
    def start(index: int) -> int:
        nvml.started = True
        return reserved

    return start


def test_the_context_is_the_process_figure_less_the_allocator():
    nvml = FakeNvml(others=30_000 * MB, process=520 * MB)
    measurement = measure_context(1, nvml, starting(nvml, reserved=20 * MB))
    assert measurement.context_bytes == 500 * MB
    assert (measurement.method, measurement.process_or_delta_bytes, measurement.reserved_bytes) == \
           ("process", 520 * MB, 20 * MB)
    assert measurement.gpu_name == "Fake H200 #1" and nvml.pids == [os.getpid()]


def test_without_a_process_list_the_device_delta_stands_in_unless_it_cannot():
    nvml = FakeNvml(others=30_000 * MB, process=452 * MB, listed=False)
    measurement = measure_context(0, nvml, starting(nvml, reserved=2 * MB))
    assert (measurement.method, measurement.context_bytes) == ("device", 450 * MB)  # other processes' use cancels
    # CUDA started before, or other ranks starting beside it: the delta would hold their contexts; no figure.
    nvml = FakeNvml(others=30_000 * MB, process=452 * MB, listed=False)
    assert measure_context(0, nvml, starting(nvml, reserved=2 * MB), delta_ok=False) is None


def test_never_negative_and_nothing_without_nvml_or_on_a_failed_call(monkeypatch):
    assert context_from(10 * MB, 12 * MB) == 0
    monkeypatch.setattr(cuda_context.PynvmlReader, "open", classmethod(lambda cls: None))  # no pynvml here anyway
    assert measure_context(0) is None

    def broken(index: int) -> int:
        raise RuntimeError("CUDA driver initialization failed")

    assert measure_context(0, FakeNvml(0, 500 * MB), broken) is None


def test_a_measurement_is_recorded_and_the_estimates_use_it():
    published = 512 * MB
    assert recorded() is None
    figure, source = context_bytes(published)
    assert figure == published and source.startswith("published constant")
    nvml = FakeNvml(others=0, process=700 * MB)
    measurement = measure_and_record(0, nvml, starting(nvml, reserved=100 * MB))
    assert recorded() == measurement
    figure, source = context_bytes(published)
    assert figure == 600 * MB and "measured with NVML on this machine (Fake H200 #0" in source


def test_memfit_system_without_a_gpu_keeps_the_constant(capsys):
    import json

    from memfit.cli import main

    assert main(["system", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["gpus"] == [] and data["cuda_context"] is None
    assert recorded() is None


def test_a_recorded_measurement_replaces_the_constant_in_the_estimate():
    from memfit.config import TrainConfig
    from memfit.estimate.memory import CUDA_CONTEXT_BYTES, GB, Hardware, estimate_memory, to_json
    from memfit.models.registry import get_architecture

    hf_config = get_architecture("smollm2-135m").to_hf_config()
    config = TrainConfig(seq_len=256)
    before = estimate_memory(hf_config, config, Hardware("cuda", 80 * GB))
    assert before.cuda_context_bytes == CUDA_CONTEXT_BYTES and not any("NVML" in note for note in before.notes)
    nvml = FakeNvml(others=0, process=400 * MB)
    measure_and_record(0, nvml, starting(nvml, reserved=100 * MB))
    after = estimate_memory(hf_config, config, Hardware("cuda", 80 * GB))
    assert after.cuda_context_bytes == 300 * MB
    assert after.breakdown["runtime"] - before.breakdown["runtime"] == 300 * MB - CUDA_CONTEXT_BYTES
    assert after.process_bytes - after.reserved_peak_bytes == 300 * MB  # nvidia-smi's figure: reserved + context
    assert any(note.startswith("CUDA context 0.29 GB: measured with NVML") for note in after.notes)
    assert to_json(after, 1, 1, [])["cuda_context_bytes"] == 300 * MB
    cpu = estimate_memory(hf_config, config, Hardware("cpu", 80 * GB))
    assert not any("NVML" in note for note in cpu.notes)
