"""`memfit demo` (what `make demo` runs): the tiny model learns the built-in data visibly, and the before/after
continuations are printed."""

import json
import subprocess
import sys


def test_demo_learns_and_shows_the_continuation_before_and_after(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "memfit", "demo", "-o", str(out), "--max-steps", "40"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1] for line in result.stdout.splitlines()
             if line.startswith(("before training:", "after training:"))}
    assert lines["before training"].strip().startswith("A prime number is")
    assert lines["after training"].strip().startswith("A prime number is")
    assert lines["before training"] != lines["after training"]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 40
    # 40 of the demo's 400 steps already take a tenth off the loss (the whole demo: see docs/benchmarks.md).
    assert sum(losses[-5:]) / 5 < 0.9 * losses[0]
    assert (out / "final" / "model.safetensors").is_file()  # every weight trained: final/ is a model dir
