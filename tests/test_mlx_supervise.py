"""`memfit train --engine mlx --supervise --reload-interval N`: the seeds' workaround for a leaking framework, on the
MLX engine. Each life of the child checkpoints and ends after N steps, the next resumes; the run ends where a
straight one does, with the same losses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

import memfit.data  # noqa: E402
from memfit.config import TrainConfig  # noqa: E402
from memfit.mlx import train_mlx  # noqa: E402
from memfit.train import TrainJob  # noqa: E402

DATA = Path(memfit.data.__file__).parent / "demo.jsonl"
SRC = Path(memfit.__file__).resolve().parent.parent


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_reload_interval_under_supervise_matches_a_straight_run(tiny_model_dir, tmp_path):
    flags = dict(max_steps=4, seq_len=64, batch_size=1, lora_rank=8, lr=1e-2, packing=False)
    out = tmp_path / "supervised"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "memfit", "train", "--engine", "mlx", "--model", str(tiny_model_dir),
               "--data", str(DATA), "-o", str(out), "--max-steps", "4", "--seq-len", "64", "--batch-size", "1",
               "--lora-rank", "8", "--lr", "1e-2", "--no-packing", "--max-memory", "8", "--supervise",
               "--reload-interval", "2"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lives = [json.loads(line) for line in (out / "supervisor.jsonl").read_text().splitlines()]
    ended = [life for life in lives if life["event"] == "ChildEnded"]
    assert [life["outcome"] for life in ended] == ["reload", "done"] and ended[0]["step"] == 2
    assert (out / "final" / "adapters.safetensors").is_file()
    straight = train_mlx(TrainJob(model=str(tiny_model_dir), data=DATA, output_dir=tmp_path / "straight"),
                         TrainConfig(**flags, max_memory=8))
    assert straight.exit_code == 0
    assert _losses(out) == _losses(tmp_path / "straight")
