"""Memory faults: an out-of-memory error inside a step (recovered in-process, same samples), one at micro-batch 1
(checkpoint, exit 4), and a leak (reported, stopped before the limit)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memfit import faults
from memfit.config import TrainConfig
from memfit.train import TrainJob, train
from memfit.train.checkpoint import open_checkpoint
from memfit.train.events import OomRecovered

from .conftest import DEMO_DATA, metrics, run, train_command

FAST = dict(seq_len=64, batch_size=4, lr=1e-2, warmup_steps=1, memory_sample_interval=0.05)
GB = 1024**3


def _train(model_dir, out, steps, events=None, **overrides):
    config = TrainConfig(**{**FAST, "max_steps": steps, **overrides})
    job = TrainJob(model=str(model_dir), data=Path(DEMO_DATA), output_dir=out, device="cpu")
    return train(job, config, on_event=events.append if events is not None else None)


def _inject(monkeypatch, spec):
    monkeypatch.setenv(faults.ENV, spec)
    faults._faults.cache_clear()


def test_injected_oom_halves_the_micro_batch_and_redoes_the_same_samples(tiny_model_dir, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    _train(tiny_model_dir, clean, steps=5)
    _inject(monkeypatch, "oom@3")
    events, recovered = [], tmp_path / "recovered"
    result = _train(tiny_model_dir, recovered, steps=5, events=events)
    assert (result.status, result.exit_code, result.step) == ("done", 0, 5)
    notices = [e for e in events if isinstance(e, OomRecovered)]
    assert [(e.step, e.micro_batch, e.grad_accum) for e in notices] == [(3, 2, 2)]
    lines = metrics(recovered)
    assert [(m["micro_batch"], m["grad_accum"]) for m in lines] == [(4, 1)] * 2 + [(2, 2)] * 3
    # Same samples, same effective batch: the same run up to float summation order.
    assert [m["tokens"] for m in lines] == [m["tokens"] for m in metrics(clean)]
    assert [m["loss"] for m in lines] == pytest.approx([m["loss"] for m in metrics(clean)], rel=1e-4)
    a = load_file(clean / "final" / "adapter_model.safetensors")
    b = load_file(recovered / "final" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    assert json.loads((recovered / "run.json").read_text())["oom_recoveries"] == 1


def test_oom_at_micro_batch_one_checkpoints_and_exits_4(tiny_model_dir, tmp_path, monkeypatch):
    _inject(monkeypatch, "oom@3+")
    result = _train(tiny_model_dir, tmp_path / "run", steps=5, batch_size=2)
    assert (result.status, result.exit_code, result.step) == ("oom", 4, 2)
    assert open_checkpoint(result.checkpoint).step == 2


def test_a_leak_is_reported_and_stopped_before_the_limit(tiny_model_dir, tmp_path):
    # leak@10: every step retains 10 MB more (a leaking framework). The guard fits the step-end memory, reports the
    # leak, and stops the step before the one the leak would take past the limit: no overshoot beyond 2%.
    out, limit_gb = tmp_path / "run", 0.85
    completed = run(train_command(tiny_model_dir, out, "--max-steps", "500", "--max-memory", str(limit_gb)),
                    fault="leak@10")
    assert completed.returncode == 3, completed.stdout + completed.stderr
    assert "Possible memory leak" in completed.stdout and "MB/step" in completed.stdout
    assert "Stopping early: a memory leak of" in completed.stdout
    steps = metrics(out)
    peak = max(max(line["peak_rss_bytes"], line["watched_bytes"]) for line in steps)
    assert peak <= limit_gb * GB * 1.02, peak / GB
    assert open_checkpoint(out).step == steps[-1]["step"]  # stopped with a checkpoint
    assert json.loads((out / "run.json").read_text())["status"] == "guard_stop"
