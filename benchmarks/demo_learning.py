"""Does the demo visibly learn? `memfit demo` as shipped (every weight of the tiny model) against the same run with
LoRA adapters only, at the LoRA learning rate that did best by hand (1e-2; the demo's 3e-3 is lower still).

    python benchmarks/demo_learning.py [--write] [--out docs/benchmarks.md]

For each: the loss at step 1, the mean of the last 20 steps, the drop, wall time of the whole command, and the
greedy continuation of the demo's prompt after training (the demo prints it; before training it is the same for
both). Fresh process each, run one after the other; the load average before and after is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from estimate_accuracy import _cpu_name, write_section  # benchmarks/ is on sys.path when run as a script

RUNS = {"memfit demo": [], "memfit demo --method lora --lr 1e-2": ["--method", "lora", "--lr", "1e-2"]}


def run(flags: list[str], out: Path) -> dict:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "memfit", "demo", "-o", str(out), *flags], capture_output=True,
                            text=True, env={**os.environ, "COLUMNS": "200"})
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"memfit demo {' '.join(flags)} failed ({result.returncode}): {result.stderr[-2000:]}")
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in result.stdout.splitlines()
             if line.startswith(("before training:", "after training:"))}
    last = sum(losses[-20:]) / len(losses[-20:])
    return {"first": losses[0], "last": last, "drop": 1 - last / losses[0], "steps": len(losses), "wall_s": wall,
            "before": lines.get("before training", "?"), "after": lines.get("after training", "?")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="memfit-demo-"))
    rows = {name: run(flags, tmp / f"run-{i}") for i, (name, flags) in enumerate(RUNS.items())}
    load_after = os.getloadavg()[0]
    lines = [f"Measured by `python benchmarks/demo_learning.py --write` on {_cpu_name()}; load average "
             f"{load_before:.1f} before, {load_after:.1f} after. Before training the model continues the prompt with "
             f"\"{rows['memfit demo']['before']}\".", "",
             "| command | steps | loss at step 1 | mean of the last 20 | drop | wall time | continuation after training |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name, row in rows.items():
        lines.append(f"| `{name}` | {row['steps']} | {row['first']:.2f} | {row['last']:.2f} | {row['drop']:.0%} | "
                     f"{row['wall_s']:.0f} s | {row['after']} |")
    body = "\n".join(lines) + "\n"
    print(body)
    if args.write:
        write_section(Path(args.out), "demo-learning", "## Does the demo learn?\n\n" + body)


if __name__ == "__main__":
    main()
