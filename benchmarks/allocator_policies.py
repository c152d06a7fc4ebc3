"""How the CPU allocator gives memory back: tokens/s, system time, page faults, step-end RSS and peak RSS of a real
`memfit train` under each policy of memfit.allocator, on a full-depth model.

Each run is a fresh `python -m memfit train` child with `MEMFIT_MALLOC=<policy>`; the policies take turns (A B C
A B C ...), so load from elsewhere hits them alike. Figures per run: tokens/s over steps 2..N (metrics.jsonl),
the child's system CPU seconds and minor page faults (os.wait4), the RSS at each step end and the process's own
VmHWM (memfit's guard reads both into metrics.jsonl), and the live-tensor estimate (`memfit estimate` for the
same run) for scale. jemalloc and tcmalloc were to be measured too; neither installs here (no wheel on the package
index this machine reaches, no system package), which the section says.

    python benchmarks/allocator_policies.py [--repeats 3] [--steps 8] [--layers 30] [--write]
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from estimate_accuracy import write_section  # noqa: E402
from memfit.allocator import DEFAULT_POLICY  # noqa: E402
from train_vs_hf import cpu_name, run_child, smollm2_and_text, versions  # noqa: E402

MARK = "allocator-policies"
MB = 1024**2
POLICIES = ("threshold", "trim", "none")
# Variants measured next to the policies: the same MEMFIT_MALLOC with glibc's transparent-huge-page tunable (glibc
# >= 2.35 madvises MADV_HUGEPAGE on what malloc maps: a fault per 2 MiB instead of per 4 KiB). A tunable is read
# when the process starts, so the child gets it in its environment.
THP_TUNABLE = "glibc.malloc.hugetlb=1"
LABELS = {"threshold": "mmap threshold fixed at 1 MiB (memfit's default)",
          "trim": "glibc's dynamic threshold + malloc_trim(0) at each step end",
          "none": "glibc as it comes (no trim)",
          "threshold+thp": "threshold, with glibc.malloc.hugetlb=1",
          "trim+thp": "trim, with glibc.malloc.hugetlb=1"}
FLAGS = ["--method", "lora", "--lora-rank", "16", "--lora-alpha", "32", "--lora-dropout", "0", "--batch-size", "4",
         "--grad-accum", "1", "--seq-len", "256", "--dtype", "fp32", "--device", "cpu", "--no-grad-checkpointing",
         "--seed", "0"]
RUN_FLAGS = ["--save-every", "100000", "--memory-report-interval", "100000", "--log-every", "1"]


def run_policy(policy: str, model_dir: Path, data: Path, work: Path, steps: int) -> dict:
    out = work / f"run-{policy}"
    command = [sys.executable, "-m", "memfit", "train", "--model", str(model_dir), "--data", str(data),
               "--output-dir", str(out), "--max-steps", str(steps), *RUN_FLAGS, *FLAGS]
    base, thp = policy.split("+")[0], policy.endswith("+thp")
    env = {"MEMFIT_MALLOC": base, **({"GLIBC_TUNABLES": THP_TUNABLE} if thp else {})}
    os.environ.update(env)
    try:
        run = run_child(command, work / f"log-{policy}.txt")
    finally:
        for name in env:
            del os.environ[name]
    if run["rc"] != 0:
        raise SystemExit(f"{policy}: exit {run['rc']}, see {run['log']}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    settled = metrics[1:]
    step_rss = [m["rss_bytes"] for m in metrics]
    subprocess.run(["rm", "-rf", str(out)], check=True)
    return {"policy": policy, "tokens_per_s": sum(m["tokens"] for m in settled) / sum(m["step_time_s"] for m in settled),
            "sys_s": run["sys_cpu_s"], "cpu_s": run["cpu_s"], "minor_faults": run["minor_faults"],
            "step_rss_bytes": step_rss, "step_peak_bytes": [m.get("window_peak_bytes") or 0 for m in metrics],
            "peak_rss_bytes": metrics[-1]["peak_rss_bytes"],
            "other_load": run["other_load_cores"], "wall_s": run["wall_s"]}


def estimate_total(model_dir: Path, data: Path) -> int:
    done = subprocess.run([sys.executable, "-m", "memfit", "estimate", "--model", str(model_dir), "--json",
                           *FLAGS],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)["total_bytes"]


def _spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def markdown(runs: list[dict], args, estimate: int, loads: tuple[float, float], text_stats: str) -> str:
    lines = [
        "## How the CPU allocator gives memory back",
        "",
        f"Measured with `python benchmarks/allocator_policies.py --repeats {args.repeats} --steps {args.steps} "
        f"--layers {args.layers}"
        f"{'' if args.policies == ','.join(POLICIES) else ' --policies ' + args.policies} --write` on {platform.machine()} {platform.system()}, {cpu_name()}, "
        f"{time.strftime('%Y-%m-%d')}; {versions()}; load average {loads[0]:.1f} before, {loads[1]:.1f} after.",
        "",
        f"smollm2-135m's shapes, {args.layers} layers (random init, fp32), LoRA r16 on all linear layers, batch 4 × "
        f"256 of packed plain text ({text_stats}), {args.steps} steps, one fresh `memfit train` per run with "
        "`MEMFIT_MALLOC` set; policies alternate. Median (min–max) over the runs. tokens/s over steps 2..N; "
        "sys s and minor faults: the child's (os.wait4); step-end RSS: the median of the run's step ends 2..N; peak "
        f"RSS: the child's own VmHWM. The estimate for this run (`memfit estimate`, same flags): "
        f"{estimate / MB:,.0f} MB. jemalloc/tcmalloc: not measured — no wheel on the package index this machine "
        "reaches and no system library (`pip download jemalloc`, `pip index versions tcmalloc`: none).",
        "",
        "| policy | tokens/s | sys s | minor faults | step-end RSS MB | step peak MB | peak RSS MB | other load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for policy in LABELS:
        mine = [run for run in runs if run["policy"] == policy]
        if not mine:
            continue
        step_end = [statistics.median(run["step_rss_bytes"][1:] or run["step_rss_bytes"]) / MB for run in mine]
        step_peak = [statistics.median(run["step_peak_bytes"][1:] or run["step_peak_bytes"]) / MB for run in mine]
        lines.append(
            f"| {LABELS[policy]} | {_spread([r['tokens_per_s'] for r in mine], '{:.1f}')} | "
            f"{_spread([r['sys_s'] for r in mine], '{:.1f}')} | {_spread([r['minor_faults'] for r in mine])} | "
            f"{_spread(step_end)} | {_spread(step_peak)} | {_spread([r['peak_rss_bytes'] / MB for r in mine])} | "
            f"{_spread([r['other_load'] or 0.0 for r in mine], '{:.2f}')} |")
    lines += ["", f"memfit's default is `{DEFAULT_POLICY}`; `src/memfit/allocator.py` says why, from these figures. "
              "Step peak: the median over steps 2..N of the guard's in-step peak (metrics.jsonl `window_peak_bytes`).",
              ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--layers", type=int, default=30, help="decoder layers (smollm2-135m has 30)")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    first_load = os.getloadavg()[0]
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        model_dir, data, text_stats = smollm2_and_text(work, args.layers)
        estimate = estimate_total(model_dir, data)
        for repeat in range(args.repeats):
            for policy in args.policies.split(","):
                run = run_policy(policy, model_dir, data, work, args.steps)
                runs.append(run)
                print(f"{repeat + 1} {policy}: {run['tokens_per_s']:.1f} tokens/s, sys {run['sys_s']:.1f} s, "
                      f"faults {run['minor_faults']:,}, step-end RSS "
                      f"{[round(b / MB) for b in run['step_rss_bytes']]} MB, peak {run['peak_rss_bytes'] / MB:.0f} MB,"
                      f" other load {run['other_load'] or 0:.2f}", flush=True)
    body = markdown(runs, args, estimate, (first_load, os.getloadavg()[0]), text_stats)
    print(body)
    if args.write:
        write_section(HERE.parent / "docs" / "benchmarks.md", MARK, body)


if __name__ == "__main__":
    main()
