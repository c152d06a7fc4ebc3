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


def test_the_seeds_command_runs_as_written_with_memfits_names(tiny_model_dir, tmp_path):
    """Seeds 000/001/003's `--model llama-8b --quant 4 --max-memory 70 --reload-interval 40 --batch-size 1
    --lora-rank 64` under the supervisor, on the tiny model (the run's length and rows are the only flags added):
    the 4-bit base, the MLX limit, one reload at step 40 and the run's end. ~20 s: 42 steps in two lives."""
    out = tmp_path / "seed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "memfit", "train", "--engine", "mlx", "--model", str(tiny_model_dir),
               "--quant", "4", "--max-memory", "8", "--reload-interval", "40", "--batch-size", "1",
               "--lora-rank", "64", "--supervise", "--data", str(DATA), "-o", str(out), "--seq-len", "64",
               "--max-steps", "42"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Set MLX memory limit to" in done.stdout and "80% of the 8.00 GB limit" in done.stdout and "finished 42 steps" in done.stdout
    lives = [json.loads(line) for line in (out / "supervisor.jsonl").read_text().splitlines()]
    ended = [life for life in lives if life["event"] == "ChildEnded"]
    assert [life["outcome"] for life in ended] == ["reload", "done"] and ended[0]["step"] == 40
    run = json.loads((out / "run.json").read_text())
    assert run["engine"] == "mlx" and run["config"]["quant"] == "4" and run["config"]["lora_rank"] == 64
    assert (out / "final" / "adapters.safetensors").is_file()
