"""memfit probe against in-process doubling + bisection (Lightning's `BatchSizeFinder(mode="binsearch")`, HF's
`auto_find_batch_size`): trials, batches tried, wall time and the batch each picks, on the same model, data and limit.

probe: `memfit probe --json` as a subprocess, each run with an empty MEMFIT_CACHE so no journal or profile of an
earlier run is reused. Baseline: one child process loads the model once (memfit's Trainer in trial mode, so both
train the same LoRA model on the same longest rows), then tries batches in that process: start at 2, double until a
trial fails, then bisect between the last success and the first failure. A baseline trial fails when its peak RSS
x (1 + margin) passes the limit, the probe's own usability rule: on CPU an artificial limit raises no OOM, so the
check on the measured peak stands in for the exception. The peak is reset before each trial (/proc/self/clear_refs),
so it is the trial's own high-water mark, but memory an earlier, larger trial left mapped counts in it too.

    python benchmarks/probe_vs_bisection.py [--steps 6] [--quick] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from estimate_accuracy import write_section

MARK = "probe-vs-bisection"
GB = 1024**3  # memfit's GB (--max-memory 0.7 = 0.7 x 2^30 bytes)
MARGIN = 0.15  # memfit probe's default
START = 2  # Lightning's init_val
MAX_BATCH = 1024  # memfit probe's default --max-batch
# (label, built-in architecture, init_model keyword arguments, seq_len, limit in GB)
CASES = [
    ("tiny", "tiny", {}, 128, 0.7),
    ("tiny", "tiny", {}, 128, 0.9),
    ("smollm2-135m (4 layers)", "smollm2-135m", {"num_layers": 4}, 64, 1.5),
]


def data_path() -> str:
    return str(resources.files("memfit").joinpath("data/demo.jsonl"))


# --- memfit probe ---------------------------------------------------------------------------------------------

def run_probe(model_dir: Path, seq: int, limit_gb: float, steps: int) -> dict:
    command = [sys.executable, "-m", "memfit", "probe", "--model", str(model_dir), "--data", data_path(),
               "--seq-len", str(seq), "--steps", str(steps), "--max-memory", str(limit_gb), "--device", "cpu",
               "--json"]
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        done = subprocess.run(command, check=False, capture_output=True, text=True,
                              env={**os.environ, "MEMFIT_CACHE": cache, "HF_HUB_OFFLINE": "1"})
        wall_s = time.perf_counter() - started
    if not done.stdout.strip():
        raise RuntimeError(f"memfit probe exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout)
    chosen = result["chosen"] or {}
    return {"method": "memfit probe", "wall_s": wall_s, "chosen": chosen.get("batch_size", 0),
            "chosen_peak": chosen.get("peak_bytes"),
            "trials": [{"batch_size": t["settings"]["batch_size"], "usable": t["usable"], "peak_bytes": t["peak_bytes"],
                        "stopped": t["steps_done"] < t["steps"], "detail": t["detail"]} for t in result["trials"]]}


# --- the baseline: one process, doubling then bisection --------------------------------------------------------

def doubling_bisection(try_batch, start: int = START, max_batch: int = MAX_BATCH) -> tuple[int, list[dict]]:
    """Lightning's binsearch: double from `start` until a trial fails, then bisect between the last success and the
    first failure. (Where `start` itself fails, Lightning returns 1 untried; this tries 1.)"""
    trials, lo, hi, batch = [], 0, None, start
    while True:
        trial = try_batch(batch)
        trials.append(trial)
        if trial["usable"]:
            lo = batch
        else:
            hi = batch
        if hi is None and batch < max_batch:
            batch = min(2 * batch, max_batch)
        elif hi is not None and hi - lo > 1:
            batch = (lo + hi) // 2
        else:
            return lo, trials


def baseline_child(model_dir: str, seq: int, limit_bytes: int, steps: int) -> dict:
    """Runs in its own process (so the RSS is the baseline's alone): load once, then every trial in-process."""
    from memfit.config import TrainConfig
    from memfit.estimate.measure import _reset_peak_rss
    from memfit.guard.sampler import peak_rss_bytes
    from memfit.train.loop import Trainer, TrainJob

    config = TrainConfig(method="lora", seq_len=seq, batch_size=1, max_steps=steps, max_memory=64,
                         save_every=10**9, memory_report_interval=10**9)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(TrainJob(model=model_dir, data=Path(data_path()), output_dir=Path(tmp) / "run",
                                   device="cpu", trial=True), config)
        trainer.setup()
        order = trainer.longest_first

        def try_batch(batch: int) -> dict:
            trainer.micro_batch = trainer.effective_batch = batch
            if not _reset_peak_rss():
                raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")
            for step in range(steps):  # the longest rows, cycling, as Trainer._rows_for_step in trial mode
                trainer._train_step([order[(step * batch + i) % len(order)] for i in range(batch)], 0)
            peak = peak_rss_bytes()
            return {"batch_size": batch, "usable": peak * (1 + MARGIN) <= limit_bytes, "peak_bytes": peak}

        try:
            chosen, trials = doubling_bisection(try_batch)
        finally:
            trainer.guard.stop()
    return {"chosen": chosen, "trials": trials}


def run_baseline(model_dir: Path, seq: int, limit_gb: float, steps: int) -> dict:
    spec = json.dumps({"model_dir": str(model_dir), "seq": seq, "limit_bytes": int(limit_gb * GB), "steps": steps})
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--baseline-child", spec], check=False, capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall_s = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"baseline child exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    peaks = {t["batch_size"]: t["peak_bytes"] for t in result["trials"]}
    return {"method": "in-process doubling+bisection", "wall_s": wall_s, "chosen": result["chosen"],
            "chosen_peak": peaks.get(result["chosen"]), "trials": result["trials"]}


# --- the report --------------------------------------------------------------------------------------------------

def fresh_trial(model_dir: Path, seq: int, limit_gb: float, steps: int, batch: int) -> dict:
    """One batch measured the way a real run meets it: a fresh process (memfit's own trial child)."""
    from memfit.config import TrainConfig
    from memfit.probe.trial import TrialSpec, run_trial

    limit = int(limit_gb * GB)
    config = TrainConfig(method="lora", seq_len=seq, batch_size=batch, max_steps=steps, max_memory=limit_gb,
                         save_every=10**9, memory_report_interval=10**9).model_dump()
    with tempfile.TemporaryDirectory() as tmp:
        trial = run_trial(TrialSpec(str(model_dir), data_path(), "cpu", config, limit), Path(tmp), steps=steps,
                          timeout_s=600)
    return {"batch_size": batch, "peak_bytes": trial.peak_bytes, "usable": trial.usable(limit, MARGIN)}


def ground_truth(model_dir: Path, seq: int, limit_gb: float, steps: int, probe: dict, baseline: dict) -> dict:
    """Fresh-process verdicts on each side's choice and the batch above it (the probe's own trials already are)."""
    known = {t["batch_size"]: t for t in probe["trials"]}
    for batch in sorted({side["chosen"] + extra for side in (probe, baseline) for extra in (0, 1)}):
        if batch >= 1 and batch not in known:
            known[batch] = fresh_trial(model_dir, seq, limit_gb, steps, batch)
    return known


def right(side: dict, truth: dict) -> str:
    """Whether a side's choice is the largest usable batch when measured in fresh processes."""
    chosen, above = truth.get(side["chosen"]), truth.get(side["chosen"] + 1)
    if chosen and chosen["usable"] and above and not above["usable"]:
        return "yes"
    if above and above["usable"]:
        return f"no: {side['chosen'] + 1} is usable ({above['peak_bytes'] / GB:.3f} GB)"
    return f"no: {side['chosen']} is not usable"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def tried(trials: list[dict]) -> str:
    """Batches in order: ✗ unusable, † stopped before its last step (the probe's guard or kill)."""
    return ", ".join(f"{t['batch_size']}" + ("" if t["usable"] else "✗") + ("†" if t.get("stopped") else "")
                     for t in trials)


def verdict(probe: dict, baseline: dict) -> str:
    ratio = len(probe["trials"]) / len(baseline["trials"])
    difference = probe["chosen"] - baseline["chosen"]
    met = ratio <= 0.5 and abs(difference) <= 1
    return (f"probe trials / baseline trials = {ratio:.2f}; chosen batch difference = {difference:+d} "
            f"(target ≤ 0.50 and ±1: {'met' if met else 'missed'})")


def markdown(results: list[dict], steps: int) -> str:
    limits = ", ".join(f"{r['label']} seq {r['seq']}: {r['limit_gb']} GB" for r in results)
    lines = [
        "## memfit probe vs in-process doubling + bisection",
        "",
        (f"Measured with `python benchmarks/probe_vs_bisection.py --write` on {cpu_name()} ({os.cpu_count()} cores), "
        f"torch {torch.__version__}, LoRA r16 fp32 on `demo.jsonl`, {steps} training steps per trial on both sides "
        f"(Lightning's default is 3). `memfit probe --json` runs as its own process with an empty cache; the "
        f"baseline is one child process that loads the model once and tries batches in-process as Lightning's "
        f"`BatchSizeFinder(mode=\"binsearch\")` does (start at {START}, double until a trial fails, then bisect), a "
        f"trial failing when its peak RSS (high-water mark reset before each trial) x {1 + MARGIN:.2f} passes the "
        f"limit, the probe's usability rule with margin {MARGIN}. Limits ({limits}) are `--max-memory` values in "
        "GB of 2^30 bytes; ✗ marks a batch found unusable, † a trial stopped before its last step; wall time is the "
        "whole process, model loading included. The last column checks each choice and the batch above it in "
        "fresh processes (memfit's trial child; the probe's own trials are such measurements): in one process, "
        "memory a larger earlier trial left mapped inflates the baseline's later peaks."),
        "",
        ("| model | seq | limit | method | trials | batches tried (in order) | wall time s | chosen batch "
         "| peak of chosen (GB) | largest usable in a fresh process? |"),
        "|---|---:|---:|---|---:|---|---:|---:|---:|---|",
    ]
    for r in results:
        for side in (r["probe"], r["baseline"]):
            peak = f"{side['chosen_peak'] / GB:.3f}" if side["chosen_peak"] else "–"
            lines.append(f"| {r['label']} | {r['seq']} | {r['limit_gb']} GB | {side['method']} | "
                         f"{len(side['trials'])} | {tried(side['trials'])} | {side['wall_s']:.1f} | "
                         f"{side['chosen']} | {peak} | {right(side, r['truth'])} |")
    lines.append("")
    for r in results:
        lines.append(f"- {r['label']}, seq {r['seq']}, {r['limit_gb']} GB: {verdict(r['probe'], r['baseline'])}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="training steps per trial, both sides")
    parser.add_argument("--quick", action="store_true", help="only the first case")
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"))
    parser.add_argument("--baseline-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_child:
        spec = json.loads(args.baseline_child)
        print(json.dumps(baseline_child(spec["model_dir"], spec["seq"], spec["limit_bytes"], spec["steps"])))
        return

    from memfit.models import init_model

    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, arch, extra, seq, limit_gb in CASES[:1] if args.quick else CASES:
            model_dir = Path(tmp) / f"{arch}-{len(results)}"
            init_model(arch, model_dir, **extra)
            probe = run_probe(model_dir, seq, limit_gb, args.steps)
            baseline = run_baseline(model_dir, seq, limit_gb, args.steps)
            truth = ground_truth(model_dir, seq, limit_gb, args.steps, probe, baseline)
            results.append({"label": label, "seq": seq, "limit_gb": limit_gb, "probe": probe, "baseline": baseline,
                            "truth": truth})
            print(f"{label} seq {seq} {limit_gb} GB: probe {tried(probe['trials'])} -> {probe['chosen']} in "
                  f"{probe['wall_s']:.0f} s; baseline {tried(baseline['trials'])} -> {baseline['chosen']} in "
                  f"{baseline['wall_s']:.0f} s", flush=True)
            for side in (probe, baseline):
                print(f"  {side['method']}: " + "; ".join(f"{t['batch_size']}: {(t['peak_bytes'] or 0) / GB:.3f} GB"
                      + (f" ({t['detail']})" if not t["usable"] and "detail" in t else "") for t in side["trials"]))
    text = markdown(results, args.steps)
    print(text)
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.write:
        write_section(Path(args.out), MARK, text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
