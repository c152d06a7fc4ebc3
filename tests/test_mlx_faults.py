"""The MLX engine under memfit's fault injection (memfit.faults), as the torch engine is tested: an out-of-memory
step is retried with the micro-batch halved (same samples, same objective), and exits 4 with a checkpoint when
micro-batch 1 fails too; a leak is reported by the guard's policy on MLX readings."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

import memfit.data  # noqa: E402
from memfit import faults  # noqa: E402
from memfit.config import TrainConfig  # noqa: E402
from memfit.errors import EXIT_OK, EXIT_OOM  # noqa: E402
from memfit.guard import Guard, MemoryLimit  # noqa: E402
from memfit.mlx import memory as mlx_memory  # noqa: E402
from memfit.mlx import train_mlx  # noqa: E402
from memfit.train import TrainJob  # noqa: E402
from memfit.train.checkpoint import list_checkpoints, open_checkpoint  # noqa: E402

DATA = Path(memfit.data.__file__).parent / "demo.jsonl"
CONFIG = dict(max_steps=3, seq_len=64, batch_size=2, lora_rank=4, lr=1e-2, packing=False, save_every=1)


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _fault(monkeypatch, spec: str) -> None:
    monkeypatch.setenv(faults.ENV, spec)
    faults._faults.cache_clear()


def test_an_oom_step_is_retried_with_half_the_micro_batch(tiny_model_dir, tmp_path, monkeypatch):
    clean = train_mlx(TrainJob(model=str(tiny_model_dir), data=DATA, output_dir=tmp_path / "clean"),
                      TrainConfig(**CONFIG))
    _fault(monkeypatch, "oom@2")
    events = []
    result = train_mlx(TrainJob(model=str(tiny_model_dir), data=DATA, output_dir=tmp_path / "oom"),
                       TrainConfig(**CONFIG), on_event=events.append)
    assert clean.exit_code == result.exit_code == EXIT_OK and result.oom_recoveries == 1
    recovered = [event for event in events if type(event).__name__ == "OomRecovered"]
    assert len(recovered) == 1 and recovered[0].step == 2 and recovered[0].micro_batch == 1
    assert recovered[0].grad_accum == 2
    # Two micro-batches of 1 carry the same token weights as one of 2: the same loss (up to summation order).
    assert _losses(tmp_path / "oom") == pytest.approx(_losses(tmp_path / "clean"), abs=1e-5)


def test_an_oom_at_micro_batch_1_exits_4_with_a_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    _fault(monkeypatch, "oom@2+")
    result = train_mlx(TrainJob(model=str(tiny_model_dir), data=DATA, output_dir=tmp_path / "run"),
                       TrainConfig(**CONFIG))
    assert result.status == "oom" and result.exit_code == EXIT_OOM and result.step == 1
    assert result.checkpoint is not None and result.checkpoint.name == "step-1"
    assert "--engine mlx --resume" in result.resume_command
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "oom"


def test_a_leak_in_mlx_memory_is_reported():
    """Step-end MLX memory rising 30 MB a step (what the seeds saw of MLX-rs, 2000 MB a step, scaled down): the
    guard's leak detector fits it from MLX readings and says at which step it reaches the limit."""
    base = mlx_memory.read_mlx_memory()
    mb = 1024**2
    step = [0]

    def reader(device):
        return replace(base, rss_bytes=100 * mb, peak_rss_bytes=100 * mb, mlx_cache_bytes=0, mlx_peak_bytes=0,
                       mlx_active_bytes=200 * mb + 30 * mb * step[0])

    guard = Guard(MemoryLimit(4 * 1024**3, 8 * 1024**3, auto=False, device="cpu"), interval_s=0, reader=reader)
    leaks = []
    for step[0] in range(1, 25):
        _, events = guard.end_step(step[0])
        leaks += [event for event in events if event.kind == "leak"]
    assert len(leaks) == 1
    assert leaks[0].leak.bytes_per_step == pytest.approx(30 * mb, rel=1e-6)
    assert "Possible memory leak" in leaks[0].message and leaks[0].leak.projected_limit_step > 24


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_an_oom_in_the_update_saves_nothing_from_it_and_the_newest_checkpoint_resumes_exactly(
        tiny_model_dir, tmp_path, monkeypatch, max_grad_norm):
    """The optimizer update's graph (with clipping, a graph of its own after the gradients; without, one graph with
    the last micro-batch's gradient, as mlx-lm's step): a failure once it is built leaves the model and optimizer
    part-way through the update. The run exits 4 and saves nothing from them: a checkpoint of step 3 here would hold
    step 4's update. The newest checkpoint (step 2) resumes to the clean run's losses."""
    config = TrainConfig(**{**CONFIG, "max_steps": 4, "save_every": 2, "max_grad_norm": max_grad_norm})
    clean = train_mlx(TrainJob(model=str(tiny_model_dir), data=DATA, output_dir=tmp_path / "clean"), config)
    _fault(monkeypatch, "oom@4:update")
    events = []
    result = train_mlx(TrainJob(model=str(tiny_model_dir), data=DATA, output_dir=tmp_path / "run"), config,
                       on_event=events.append)
    assert result.status == "oom" and result.exit_code == EXIT_OOM and result.step == 3
    assert result.oom_recoveries == 0 and result.checkpoint.name == "step-2"
    assert [path.name for path in list_checkpoints(tmp_path / "run")] == ["step-2"]
    assert any("optimizer update of step 4" in getattr(event, "message", "") for event in events)
    _fault(monkeypatch, "")
    resumed = train_mlx(TrainJob(model=str(tiny_model_dir), data=DATA, output_dir=tmp_path / "run",
                                 resume=open_checkpoint(tmp_path / "run")), config)
    assert clean.exit_code == resumed.exit_code == EXIT_OK
    assert _losses(tmp_path / "run") == _losses(tmp_path / "clean")


def test_with_clipping_an_oom_in_the_last_backward_pass_is_retried(tiny_model_dir, tmp_path, monkeypatch):
    """With clipping the last micro-batch's gradients are evaluated before the update's graph is built: an
    out-of-memory error there leaves the model untouched, so the step is retried with half the micro-batch, to the
    clean run's losses."""
    config = TrainConfig(**{**CONFIG, "max_grad_norm": 1.0})
    clean = train_mlx(TrainJob(model=str(tiny_model_dir), data=DATA, output_dir=tmp_path / "clean"), config)
    _fault(monkeypatch, "oom@2:backward")
    result = train_mlx(TrainJob(model=str(tiny_model_dir), data=DATA, output_dir=tmp_path / "run"), config)
    assert result.exit_code == EXIT_OK and result.oom_recoveries == 1
    assert faults.fired and faults.fired[-1]["phase"] == "backward" and faults.fired[-1]["micro_batch"] == 1
    assert _losses(tmp_path / "run") == pytest.approx(_losses(tmp_path / "clean"), abs=1e-5)
