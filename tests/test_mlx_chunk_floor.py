"""benchmarks/mlx_chunk_floor.py runs on CPU: each floor's child runs the trainer's step in the chunk that floor
gives, and the chunk does not change the loss (docs and memfit.train.chunk_size quote its figures)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mlx_chunk_floor.py"


def test_each_floor_runs_its_chunk_and_the_same_loss(tiny_model_dir):
    completed = subprocess.run([sys.executable, str(SCRIPT), str(tiny_model_dir), "--floors", "128,32", "--batch-size",
                                "4", "--seq-len", "256", "--dtype", "fp32", "--steps", "2"],
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    runs = json.loads(completed.stdout.strip().splitlines()[-1])
    # The tiny model (vocabulary 2,048, hidden 128): Liger's rule gives 64-token chunks for 1,024 tokens, so a floor
    # of 128 raises the chunk and a floor of 32 leaves it.
    assert runs["128"][0]["chunk_tokens"] == 128 and runs["32"][0]["chunk_tokens"] == 64
    assert all(run["train_peak_bytes"] > 0 and len(run["step_seconds"]) == 2
               for found in runs.values() for run in found)
    assert runs["128"][0]["loss"] == pytest.approx(runs["32"][0]["loss"], rel=1e-5)
