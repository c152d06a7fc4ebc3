"""What supervision costs: the same run unsupervised, supervised, supervised with --reload-interval, and supervised
through an OOM kill (MEMFIT_FAULTS=sigkill@K), on the tiny model on CPU, each in a fresh process.

Reported: wall time of the whole command, the time from a child's end to its successor's first step (the cost of
one restart: process start, imports, model load, checkpoint restore), and whether the supervised losses equal the
unsupervised ones (bit for bit with reloads; within float summation order after an OOM kill halves the micro-batch).

    python benchmarks/supervisor_restart.py [--steps 60] [--write] [--out docs/reliability.md]
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
import time
from importlib import resources
from pathlib import Path

import torch
from estimate_accuracy import _cpu_name, write_section  # benchmarks/ is on sys.path when run as a script

from memfit.models import init_model

DATA = str(resources.files("memfit").joinpath("data/demo.jsonl"))


def _run(model_dir: Path, out: Path, steps: int, *flags: str, fault: str | None = None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MEMFIT_FAULTS", None)
    if fault:
        env["MEMFIT_FAULTS"] = fault
    command = [sys.executable, "-m", "memfit", "train", "--model", str(model_dir), "--data", DATA, "--output-dir",
               str(out), "--seq-len", "64", "--batch-size", "4", "--device", "cpu", "--max-steps", str(steps),
               "--save-every", "10", *flags]
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(flags)} failed ({completed.returncode}): {completed.stderr[-2000:]}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    restarts = []
    log = out / "supervisor.jsonl"
    if log.exists():
        ends = [json.loads(line) for line in log.read_text().splitlines()]
        for end in (line for line in ends if line["event"] == "ChildEnded" and line["action"] != "exit"):
            first = next(m for m in metrics if m.get("attempt") == end["attempt"] + 1)
            restarts.append(first["time"] - first["step_time_s"] - end["time"])
    return {"wall": wall, "losses": [m["loss"] for m in metrics], "restarts": restarts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "reliability.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        model_dir = init_model("tiny", root / "tiny")
        cases = [("unsupervised", (), None), ("--supervise", ("--supervise",), None),
                 ("--supervise --reload-interval 20", ("--supervise", "--reload-interval", "20"), None),
                 (f"--supervise, SIGKILL at step {args.steps // 2 + 1}", ("--supervise",),
                  f"sigkill@{args.steps // 2 + 1}")]
        results = {name: _run(model_dir, root / str(number), args.steps, *flags, fault=fault)
                   for number, (name, flags, fault) in enumerate(cases)}
    base = results["unsupervised"]
    rows = ["| run | wall s | restarts | s per restart (end → next first step) | losses vs unsupervised |",
            "|---|---:|---:|---:|---|"]
    for name, result in results.items():
        same = result["losses"] == base["losses"]
        close = max(abs(a - b) / abs(b) for a, b in zip(result["losses"], base["losses"]))
        per = f"{statistics.median(result['restarts']):.1f}" if result["restarts"] else "–"
        rows.append(f"| {name} | {result['wall']:.1f} | {len(result['restarts'])} | {per} | "
                    f"{'identical' if same else f'max relative difference {close:.1e}'} |")
    body = (f"Measured by `python benchmarks/supervisor_restart.py --steps {args.steps} --write`: the tiny model, "
            f"LoRA, batch 4 × 64 tokens, checkpoint every 10 steps, {args.steps} steps, fresh process each; "
            f"{_cpu_name()}, {os.cpu_count()} cores, {platform.system()}, torch {torch.__version__}.\n\n"
            + "\n".join(rows) + "\n")
    print(body)
    if args.write:
        write_section(Path(args.out), "supervisor-restart", body)


if __name__ == "__main__":
    main()
