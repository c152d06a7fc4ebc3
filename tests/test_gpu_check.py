"""benchmarks/gpu_check.py, the whole CUDA verification, run on CPU (`--device cpu --quick`) so that its code cannot
rot while no GPU runs it: the estimate against the measured peak, the guard's stop and exact resume, an
out-of-memory recovered, probe, memfit vs HF Trainer + PEFT.

Slow: about ten real processes (a measurement child, four `memfit train` runs and a resume, a probe, an HF Trainer
run), 57 s of CPU time; measured on 2 cores on 2026-12-03 at 98 s wall at load 4-5 (other work sharing them: model
6 s, estimate 12 s, guard 26 s, vs HF 19 s, oom 11 s, probe 23 s) and 208 s under heavier load. Over the ~60 s aimed
at: each section is one or a few process starts (imports are most of a tiny-model run), and fewer would check less."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "check.md"
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = out.read_text()
    for section in ("estimate", "guard", "vs-hf"):
        assert f"<!-- gpu-check-{section}-cpu -->" in text and f"<!-- /gpu-check-{section}-cpu -->" in text
    results = json.loads(out.with_suffix(".json").read_text())

    # The estimate's rows: one per case, the process figure within 15% of the child's peak RSS (a tiny model: the
    # baseline is most of it), the CUDA-only counters absent on CPU.
    assert results["estimate"] and all(row["model"] in text for row in results["estimate"])
    for row in results["estimate"]:
        assert row["measured"]["allocated"] is None and row["measured"]["reserved"] is None
        assert 100 * 2**20 < row["measured"]["process"] < 4 * 2**30
        assert abs(row["error"]["process"]) < 15, row

    guard = results["guard"]
    assert guard["ok"] and guard["stop_exit"] == 3 and guard["checkpoint_step"] == 2 and guard["losses_equal"]
    assert guard["clean_peak_bytes"] < guard["limit_bytes"]
    oom = results["oom"]
    assert oom["ok"] and oom["recoveries"] == 1 and oom["layout"][0] == [4, 1] and oom["layout"][-1] == [2, 2]

    profile = results["probe"]["profile"]
    assert results["probe"]["exit"] == 0 and profile["chosen"]["batch_size"] >= 1
    assert "| probe | exit 0 |" in text

    (hf,) = results["vs_hf"]
    assert hf["method"] == "lora" and hf["memfit_tokens_per_s"] > 0 and hf["hf_tokens_per_s"] > 0
    assert 100 * 2**20 < hf["memfit_peak_bytes"] < 4 * 2**30 and 100 * 2**20 < hf["hf_peak_bytes"] < 4 * 2**30
    assert "| lora | 4 × 64 |" in text
