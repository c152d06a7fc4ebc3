"""benchmarks/mlx_memory_limit.py runs on CPU: each mode's child runs the trainer's step under its MLX memory limit,
the limit changes what is held at once, never the arithmetic (docs/benchmarks.md quotes its figures)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mlx_memory_limit.py"


def test_each_limit_runs_the_same_step(tiny_model_dir):
    completed = subprocess.run([sys.executable, str(SCRIPT), str(tiny_model_dir), "--batch-size", "2", "--seq-len",
                                "256", "--dtype", "fp32", "--no-chunked-loss", "--headroom", "0.25", "--steps", "2",
                                "--repeats", "1"], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    runs = json.loads(completed.stdout.strip().splitlines()[-1])
    assert list(runs) == ["none", "need", "+25%"] and all(len(found) == 1 for found in runs.values())
    need = runs["need"][0]["train_peak_bytes"]
    assert runs["+25%"][0]["limit_bytes"] == int(need * 1.25)
    assert need <= runs["none"][0]["train_peak_bytes"]  # nothing run ahead is the least the step holds
    losses = {found[0]["loss"] for found in runs.values()}
    assert max(losses) == pytest.approx(min(losses), rel=1e-6)
