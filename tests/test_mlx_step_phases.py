"""benchmarks/mlx_step_phases.py runs on CPU (so the figures docs/mlx.md quotes from it can be made again): each part
of the MLX step is measured, and evaluating the gradients first holds at least what the forward and backward pass
alone hold (it is that evaluation, then the update)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mlx_step_phases.py"


def test_step_phases_measures_every_part(tiny_model_dir):
    completed = subprocess.run([sys.executable, str(SCRIPT), str(tiny_model_dir), "--batch-size", "1", "--seq-len",
                                "128", "--dtype", "fp32"], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    found = json.loads(completed.stdout.strip().splitlines()[-1])
    parts = ("forward", "forward_backward", "fused_step", "unclipped_step", "gradients_first", "trainer_step")
    assert all(found[f"{part}_bytes"] > 0 for part in parts), found
    assert found["forward_backward_bytes"] > found["forward_bytes"]
    assert found["gradients_first_bytes"] >= found["forward_backward_bytes"] * 0.95, found
    # The trainer clips (max_grad_norm 1, the default) with its gradients evaluated first: the same graphs.
    assert found["trainer_step_bytes"] == pytest.approx(found["gradients_first_bytes"], rel=0.05), found


def test_step_phases_min_chunk_tokens_sets_the_chunk(tiny_model_dir):
    """--min-chunk-tokens replaces the chunked loss's floor for the run: 4 x 256 tokens of the tiny model run in
    chunks of 128 instead of 64 (docs/mlx.md measures what other chunks hold)."""
    completed = subprocess.run([sys.executable, str(SCRIPT), str(tiny_model_dir), "--batch-size", "4", "--seq-len",
                                "256", "--dtype", "fp32", "--min-chunk-tokens", "128"],
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    found = json.loads(completed.stdout.strip().splitlines()[-1])
    assert found["chunk_tokens"] == 128 and found["trainer_step_bytes"] > 0
