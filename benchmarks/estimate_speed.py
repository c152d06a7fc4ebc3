"""How long `memfit estimate`, `recommend`, `models`, `--help` and a usage error take, as whole processes.

Each command runs as `python -m memfit ...` in a child process: cold = an empty `$MEMFIT_CACHE` (every trace
runs, torch, transformers and PEFT are imported), warm = the same command again with the cache the cold run
left (memfit.cache). Wall time per run (min / median / max over the repeats), the children's CPU time
(user + system), the traces the cold run kept (files in the cache), and the 1-minute load average before each
command: on a shared machine the load average says how much of the wall time was waiting for a core. Writes the
table into docs/benchmarks.md (section `estimate-speed`).

    python benchmarks/estimate_speed.py [--repeats 3] [--cold-repeats 1] [--quick] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from estimate_accuracy import write_section  # noqa: E402

CUDA = ["--device", "cuda"]
# (label, arguments, whether a cold run means anything: commands that read no cache run the same every time)
COMMANDS = [
    ("estimate 8B LoRA, 24 GB", ["estimate", "--model", "llama-3.1-8b", "--method", "lora", "--seq-len", "2048",
                                 "--grad-checkpointing", "--memory-gb", "24", *CUDA], True),
    ("estimate 8B QLoRA, 24 GB", ["estimate", "--model", "llama-3.1-8b", "--method", "qlora", "--seq-len",
                                  "2048", "--grad-checkpointing", "--memory-gb", "24", *CUDA], True),
    ("estimate 8B full, 80 GB (does not fit: what to change)",
     ["estimate", "--model", "llama-3.1-8b", "--method", "full", "--seq-len", "2048", "--grad-checkpointing",
      "--memory-gb", "80", *CUDA], True),
    ("estimate 70B LoRA, 80 GB x8 ZeRO-3", ["estimate", "--model", "llama-3.1-70b", "--method", "lora",
                                            "--seq-len", "2048", "--grad-checkpointing", "--memory-gb", "80",
                                            "--num-gpus", "8", "--zero", "3", *CUDA], True),
    ("estimate 70B QLoRA, 80 GB", ["estimate", "--model", "llama-3.1-70b", "--method", "qlora", "--seq-len",
                                   "2048", "--grad-checkpointing", "--memory-gb", "80", *CUDA], True),
    ("estimate 70B full, 80 GB x8 ZeRO-3", ["estimate", "--model", "llama-3.1-70b", "--method", "full",
                                            "--seq-len", "2048", "--grad-checkpointing", "--memory-gb", "80",
                                            "--num-gpus", "8", "--zero", "3", *CUDA], True),
    ("estimate 3B full, 80 GB (issue 16's runaway)", ["estimate", "--model", "llama-3.2-3b", "--method", "full",
                                                      "--grad-checkpointing", "--memory-gb", "80", *CUDA], True),
    ("recommend, 24 GB", ["recommend", "--memory-gb", "24", *CUDA], True),
    ("models", ["models"], False),
    ("--help", ["--help"], False),
    ("usage error (estimate --bogus)", ["estimate", "--bogus"], False),
]
# What any traced estimate must import before it can build a model on fake tensors, without memfit: the floor
# under a cold estimate (transformers' modeling_utils pulls in torch.distributed.tensor, torch._dynamo, sympy...).
IMPORT_FLOOR = ("import floor: torch, fake tensors, transformers' model code (no memfit)",
                ["-c", "import torch, transformers; from torch._subclasses.fake_tensor import FakeTensorMode; "
                       "from transformers import modeling_utils"], False)
COMMANDS.append(IMPORT_FLOOR)
QUICK = {"estimate 8B LoRA, 24 GB", "models", "--help", "usage error (estimate --bogus)", IMPORT_FLOOR[0]}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(args: list[str], cache: Path) -> tuple[float, float, int]:
    """(wall s, CPU s, exit code) of one `python -m memfit ARGS` with MEMFIT_CACHE=cache."""
    env = {**os.environ, "MEMFIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    cpu = _children_cpu()
    start = time.perf_counter()
    command = [sys.executable, *args] if args[0] == "-c" else [sys.executable, "-m", "memfit", *args]
    completed = subprocess.run(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    return wall, _children_cpu() - cpu, completed.returncode


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def _traces(cache: Path) -> int:
    return len(list((cache / "estimate" / "trace").glob("*.json")))


def measure(repeats: int, cold_repeats: int, quick: bool) -> list[dict]:
    rows = []
    for label, args, cached in COMMANDS:
        if quick and label not in QUICK:
            continue
        load = os.getloadavg()[0]
        shown = f"python -c \"{args[1]}\"" if args[0] == "-c" else "memfit " + " ".join(args)
        row = {"label": label, "command": shown, "load": load, "cold": [], "cold_cpu": [],
               "warm": [], "warm_cpu": [], "traces": None, "codes": set()}
        with tempfile.TemporaryDirectory() as scratch:
            cache = Path(scratch) / "cache"
            if cached:
                for _ in range(cold_repeats):
                    shutil.rmtree(cache, ignore_errors=True)
                    wall, cpu, code = run_once(args, cache)
                    row["cold"].append(wall)
                    row["cold_cpu"].append(cpu)
                    row["codes"].add(code)
                row["traces"] = _traces(cache)
            for _ in range(repeats):
                wall, cpu, code = run_once(args, cache)
                row["warm"].append(wall)
                row["warm_cpu"].append(cpu)
                row["codes"].add(code)
        rows.append(row)
        print(f"{label}: cold {_spread(row['cold'])} s, warm {_spread(row['warm'])} s "
              f"(cpu {_spread(row['warm_cpu'])} s), load {load:.1f}, exit {sorted(row['codes'])}", flush=True)
    return rows


def _versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in ("torch", "transformers", "peft"))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown(rows: list[dict], repeats: int, cold_repeats: int, loads: tuple[float, float]) -> str:
    lines = [
        "## How long an estimate takes, cold and warm",
        "",
        f"Measured with `python benchmarks/estimate_speed.py --repeats {repeats} --cold-repeats {cold_repeats}` on "
        f"{platform.machine()} {platform.system()}, {_cpu_name()} ({os.cpu_count()} cores), Python "
        f"{platform.python_version()}, {_versions()}. Each run is a whole `python -m memfit ...` process. Cold: "
        "an empty `$MEMFIT_CACHE`; warm: the same command again on the cache the cold run left. Wall seconds as "
        "min / median / max over the runs (one number: one run); CPU = the process's user + system seconds "
        "(median); traces = the fake-tensor traces the cold run kept; load = the 1-minute load average before "
        f"the command (the run began at {loads[0]:.1f} and ended at {loads[1]:.1f}: on {os.cpu_count()} cores, "
        "a load above that means wall time spent waiting for a core, which CPU time leaves out).",
        "",
        "| command | cold wall s | cold CPU s | traces | warm wall s | warm CPU s | load |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        codes = "" if row["codes"] <= {0} or "usage" in row["label"] else f" (exit {sorted(row['codes'])})"
        cold_cpu = f"{statistics.median(row['cold_cpu']):.2f}" if row["cold_cpu"] else "-"
        traces = "-" if row["traces"] is None else str(row["traces"])
        lines.append(f"| `{row['command']}`{codes} | {_spread(row['cold'])} | {cold_cpu} | {traces} | "
                     f"{_spread(row['warm'])} | {statistics.median(row['warm_cpu']):.2f} | {row['load']:.1f} |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="warm runs (and runs of the cache-free commands)")
    parser.add_argument("--cold-repeats", type=int, default=1, help="cold runs, each on an empty cache")
    parser.add_argument("--quick", action="store_true", help="8B LoRA, models, --help and a usage error only")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    first = os.getloadavg()[0]
    rows = measure(args.repeats, args.cold_repeats, args.quick)
    body = markdown(rows, args.repeats, args.cold_repeats, (first, os.getloadavg()[0]))
    write_section(Path(args.out), "estimate-speed", body)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
