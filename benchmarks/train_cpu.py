"""memfit train on this CPU: tokens/s and peak RSS of the demo configuration, the guard's cost inside a real run
(background sampling every 0.1 s vs step-end reads only), and the estimator's prediction for the same run.

Each run is a fresh `memfit train` process on the tiny model and the built-in dataset; runs with and without the
sampling thread alternate, so load from elsewhere on the machine hits both alike.

    python benchmarks/train_cpu.py [--pairs 3] [--steps 100] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from estimate_accuracy import write_section  # noqa: E402

MARK = "train-cpu"
FLAGS = ["--method", "lora", "--seq-len", "128", "--batch-size", "8", "--lr", "3e-3", "--device", "cpu",
         "--save-every", "100000", "--memory-report-interval", "100000"]


def run(model_dir: Path, out: Path, steps: int, interval: float) -> dict:
    data = str(resources.files("memfit").joinpath("data/demo.jsonl"))
    command = [sys.executable, "-m", "memfit", "train", "--model", str(model_dir), "--data", data,
               "--output-dir", str(out), "--max-steps", str(steps), "--memory-sample-interval", str(interval), *FLAGS]
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    settled = metrics[len(metrics) // 5:]  # past warm-up
    run_json = json.loads((out / "run.json").read_text())
    return {"tokens_per_s": sum(m["tokens"] for m in settled) / sum(m["step_time_s"] for m in settled),
            "peak_rss_bytes": max(m["peak_rss_bytes"] for m in metrics),
            "estimate_bytes": run_json["estimate_bytes"], "final_loss": metrics[-1]["avg_loss"],
            "first_loss": metrics[0]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"))
    args = parser.parse_args()

    from memfit.models import init_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = init_model("tiny", Path(tmp) / "tiny")
        on, off = [], []
        for pair in range(args.pairs):
            off.append(run(model_dir, Path(tmp) / f"off{pair}", args.steps, 0.0))
            on.append(run(model_dir, Path(tmp) / f"on{pair}", args.steps, 0.1))
    slowdowns = [1 - a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(on, off)]
    peak = statistics.median(r["peak_rss_bytes"] for r in on)
    estimate = on[0]["estimate_bytes"]
    mb = 1024**2
    lines = [
        "## Training on CPU (the demo configuration)",
        "",
        f"Measured with `python benchmarks/train_cpu.py --write` on {platform.machine()} {platform.system()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}: `memfit train` of the tiny llama (1.2M params), LoRA r16 "
        f"on all linear layers, batch 8 x 128 tokens (packed), fp32, {args.steps} steps, {args.pairs} alternating "
        "pairs of fresh processes.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| tokens/s, guard sampling every 0.1 s (median) | {statistics.median(r['tokens_per_s'] for r in on):,.0f} |",
        f"| tokens/s, step-end reads only (median) | {statistics.median(r['tokens_per_s'] for r in off):,.0f} |",
        f"| guard slowdown, median of pairs (min to max) | {statistics.median(slowdowns):+.1%} "
        f"({min(slowdowns):+.1%} to {max(slowdowns):+.1%}) |",
        f"| peak RSS of the `memfit train` process (median) | {peak / mb:,.0f} MB |",
        f"| estimator's prediction in run.json | {estimate / mb:,.0f} MB ({estimate / peak - 1:+.1%}) |",
        f"| loss, first step -> average of the last 20 | {on[0]['first_loss']:.3f} -> {on[0]['final_loss']:.3f} |",
        "",
        "Slowdown is 1 - (tokens/s with sampling) / (tokens/s without) within each back-to-back pair; its spread is "
        "the machine's noise. The estimate counts the training step and a Python+torch+PEFT baseline; the CLI "
        "process also holds typer, rich, the tokenizer and the dataset.",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.write:
        write_section(Path(args.out), MARK, table)


if __name__ == "__main__":
    main()
