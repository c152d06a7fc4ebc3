"""benchmarks/mlx_eval_order.py runs on CPU: each width's children run the trainer's step with MLX_BFS_MAX_WIDTH set,
the order changes what is held at once, never the arithmetic (docs/benchmarks.md quotes its figures)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mlx_eval_order.py"


def test_each_width_runs_the_same_step(tiny_model_dir):
    completed = subprocess.run([sys.executable, str(SCRIPT), str(tiny_model_dir), "--batch-size", "4", "--seq-len",
                                "256", "--dtype", "fp32", "--widths", "20,1", "--steps", "2", "--repeats", "1"],
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    found = json.loads(completed.stdout.strip().splitlines()[-1])
    assert list(found["need"]) == list(found["free"]) == ["1", "20"]  # sorted, one run each
    assert all(len(runs) == 1 for runs in found["free"].values())
    # What MLX_BFS_MAX_WIDTH=1 (the opt-in) does: the tiny model's checkpointed step needs less than in MLX's default
    # order (28.7 against 40.4 MB with mlx-lm's checkpoint; 27.4 against 32.5 MiB since the backward pass is ordered,
    # memfit.mlx.model.ordered_checkpoint). Fresh children: MLX reads it once a process.
    assert found["need"]["1"]["train_peak_bytes"] < 0.93 * found["need"]["20"]["train_peak_bytes"]
    losses = [run["loss"] for run in found["need"].values()] + [runs[0]["loss"] for runs in found["free"].values()]
    assert max(losses) == pytest.approx(min(losses), rel=1e-5)
