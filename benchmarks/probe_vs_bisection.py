"""memfit probe against in-process doubling + bisection, both graded by fresh-process re-measurements.

For each case (model, sequence length, limit) three things run, one after the other:

1. memfit probe: `memfit probe --json` as a subprocess with an empty MEMFIT_CACHE (no journal or profile of an
   earlier run is reused). Its trials are child processes; its answer is its largest usable batch.
2. The baseline: one child process loads the model once (memfit's Trainer in trial mode: the same LoRA model, data
   and rows as a probe trial) and tries batches in that process with the control flow of Lightning's
   `BatchSizeFinder(mode="binsearch")` (`_run_binary_scaling`, see `doubling_bisection`): start at 2, double after
   every success until a trial fails, then bisect between the last success and the first failure until they are 1
   apart; the answer is the last success. What differs from Lightning: a trial "fails" when its peak RSS x (1 +
   margin) passes the limit (the probe's usability rule, margin included), read after the trial's steps, because
   on CPU an artificial limit raises no out-of-memory error; the peak is reset before each trial
   (/proc/self/clear_refs), so it is that trial's high-water mark, though memory the process kept from earlier
   trials counts in it; before each trial memfit's release_memory() runs (gc.collect() and glibc malloc_trim(0)),
   the CPU counterpart of Lightning's garbage_collection_cuda() (gc.collect() and torch.cuda.empty_cache()).
3. The truth: each side's chosen batch and chosen batch + 1 are re-measured, each in `--repeats` fresh processes
   (memfit's trial child, `python -m memfit.child trial SPEC RUN_DIR`, started here with a new spec and run directory
   and the same config, limit and steps the probe gives its trials; none of the probe's recorded results is read).
   "+ 1" literally: both searches run over every integer batch (the probe without --pow2, the baseline's bisection
   until high - low <= 1), so the next batch up in either side's grid is chosen + 1, and "largest usable" claims
   exactly that chosen + 1 is not usable. The repeats are interleaved (round r measures every batch once) so a
   change in the machine's load falls on all batches alike. A batch is usable in one process when it ran every step
   and peak x (1 + margin) <= limit (memfit.probe.trial.Trial.usable, the probe's rule).

The estimator's cache: a training process (a probe trial, the baseline, a re-measurement) estimates its own memory
at start, and with an empty MEMFIT_CACHE that traces the model on fake tensors, which leaves the process a few MB
larger for the rest of its life. The probe's trials find a cache its parent filled (it estimates every batch it
tries), and so does a real run after a probe. So each case has one cache of the benchmark's own, filled by a
separate estimating process for batch 1 before the baseline (which estimates batch 1 at start) and for the batches
to re-measure before the re-measurements; the report says if a re-measurement still had to trace.

    python benchmarks/probe_vs_bisection.py [--steps 6] [--repeats 3] [--quick] [--write] [--save FILE]
"""

from __future__ import annotations

import argparse
import gc
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from estimate_accuracy import write_section

MARK = "probe-vs-bisection"
GB = 1024**3  # memfit's GB (--max-memory 0.9 = 0.9 x 2^30 bytes)
MB = 1024**2  # peaks are shown in MB: neighbouring batches differ by a few
MARGIN = 0.15  # memfit probe's default
START = 2  # Lightning's BatchSizeFinder init_val default
MAX_TRIALS = 25  # Lightning's BatchSizeFinder max_trials default
MAX_BATCH = 1024  # cap on doubling: memfit probe's default --max-batch (Lightning caps at the dataset's length)
COMMAND = "python benchmarks/probe_vs_bisection.py --write"
# (label, built-in architecture, init_model keyword arguments, seq_len, limit in GB)
# Two cases: each costs a probe, a baseline and up to 4 batches x --repeats fresh processes (about 5 minutes on a
# quiet 2-core machine), so the whole run stays near 10 minutes there.
CASES = [
    ("tiny", "tiny", {}, 128, 0.9),
    ("smollm2-135m (4 layers)", "smollm2-135m", {"num_layers": 4}, 64, 1.5),
]


def data_path() -> str:
    return str(resources.files("memfit").joinpath("data/demo.jsonl"))


def trial_config(seq: int, batch: int, steps: int, max_memory_gb: float) -> dict:
    """A trial's TrainConfig values as memfit probe builds them (Probe._config_for and Probe._run) from
    `memfit probe --seq-len SEQ --steps STEPS --max-memory G` with every other flag at its default."""
    from memfit.config import make_config

    values = make_config(seq_len=seq).updated(batch_size=batch, grad_accum=1).model_dump()
    values.update(max_steps=steps, max_memory=max_memory_gb, eval_every=None, save_every=10**9,
                  memory_report_interval=10**9)
    return values


# --- memfit probe ---------------------------------------------------------------------------------------------

def run_probe(model_dir: Path, seq: int, limit_gb: float, steps: int, cache: Path) -> dict:
    command = [sys.executable, "-m", "memfit", "probe", "--model", str(model_dir), "--data", data_path(),
               "--seq-len", str(seq), "--steps", str(steps), "--max-memory", str(limit_gb), "--device", "cpu",
               "--margin", str(MARGIN), "--json"]
    started = time.perf_counter()
    done = subprocess.run(command, check=False, capture_output=True, text=True,
                          env={**os.environ, "MEMFIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
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

def doubling_bisection(try_batch, start: int = START, max_trials: int = MAX_TRIALS,
                       max_batch: int = MAX_BATCH) -> tuple[int, list[dict]]:
    """The control flow of Lightning's `_run_binary_scaling` (BatchSizeFinder mode="binsearch"): low = 1; after a
    success, low = the batch, then bisect (low + high) // 2 if a failure is known (stop when high - low <= 1), else
    double; after a failure, high = the batch, next (low + high) // 2, stop when high - low <= 1. The answer is
    the batch it ends on: the last success, or 1 untried where `start` itself failed. Doubling stops at
    `max_batch` (Lightning: the dataset's length); more than `max_trials` successes end it."""
    trials: list[dict] = []
    low, high, count, batch = 1, None, 0, start
    while True:
        trial = try_batch(batch)
        trials.append(trial)
        if trial["usable"]:
            count += 1
            if count > max_trials:
                return batch, trials
            low = batch
            if high:
                if high - low <= 1:
                    return batch, trials
                batch = (high + low) // 2
            else:
                doubled = min(2 * batch, max_batch)
                if doubled == batch:
                    return batch, trials
                batch = doubled
        else:
            high = batch
            batch = (high + low) // 2
            if high - low <= 1:
                return batch, trials


def baseline_child(model_dir: str, seq: int, limit_bytes: int, steps: int) -> dict:
    """Runs in its own process (so the RSS is the baseline's alone): load once, then every trial in-process."""
    from memfit.config import TrainConfig
    from memfit.estimate.measure import _reset_peak_rss
    from memfit.guard import release_memory
    from memfit.guard.sampler import peak_rss_bytes
    from memfit.train.loop import Trainer, TrainJob

    # The guard gets a limit it never nears (64 GB): Lightning has none, and memfit's would release memory at 80%
    # of the limit and stop the trial at it, which would change what the baseline measures.
    config = TrainConfig(**trial_config(seq, 1, steps, 64))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(TrainJob(model=model_dir, data=Path(data_path()), output_dir=Path(tmp) / "run",
                                   device="cpu", trial=True), config)
        trainer.setup()

        def try_batch(batch: int) -> dict:
            release_memory()
            trainer.micro_batch = trainer.effective_batch = trainer.global_batch = trainer.steps.effective_batch = batch
            trainer.step, trainer.samples_seen, trainer.total_steps = 0, 0, steps
            if not _reset_peak_rss():
                raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")
            started = time.perf_counter()
            for _ in range(steps):  # the rows a trial child trains at this batch (Trainer._rows_for_step)
                trainer.steps.step = trainer.step
                trainer.steps.train_step(trainer._rows_for_step(), 0)
                trainer.step += 1
                trainer.samples_seen += batch
            peak = peak_rss_bytes()
            usable = peak * (1 + MARGIN) <= limit_bytes
            print(f"    baseline batch {batch}: {peak / MB:.1f} MB, {'usable' if usable else 'fails'} "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
            return {"batch_size": batch, "usable": usable, "peak_bytes": peak}

        try:
            chosen, trials = doubling_bisection(try_batch)
        finally:
            trainer.guard.stop()
    return {"chosen": chosen, "trials": trials}


def run_baseline(model_dir: Path, seq: int, limit_gb: float, steps: int, cache: Path) -> dict:
    spec = json.dumps({"model_dir": str(model_dir), "seq": seq, "limit_bytes": int(limit_gb * GB), "steps": steps})
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--baseline-child", spec], check=False, stdout=subprocess.PIPE,
                          text=True, env={**os.environ, "MEMFIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    wall_s = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"baseline child exited {done.returncode}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    peaks = {t["batch_size"]: t["peak_bytes"] for t in result["trials"]}
    return {"method": "in-process doubling+bisection", "wall_s": wall_s, "chosen": result["chosen"],
            "chosen_peak": peaks.get(result["chosen"]), "trials": result["trials"]}


# --- the estimator's cache ---------------------------------------------------------------------------------------

def warm_child(model_dir: str, seq: int, limit_bytes: int, steps: int, batches: list[int]) -> None:
    """Estimate each batch as a training process does at start (Trainer._estimate_bytes), filling MEMFIT_CACHE."""
    from memfit.config import TrainConfig
    from memfit.estimate.memory import Hardware, estimate_memory
    from memfit.models import resolve_model

    resolved = resolve_model(model_dir)
    for batch in batches:
        config = TrainConfig(**trial_config(seq, batch, steps, limit_bytes / GB))
        estimate_memory(resolved.config, config, Hardware("cpu", limit_bytes), resolved.name)


def warm_cache(model_dir: Path, seq: int, limit_gb: float, steps: int, batches: list[int], cache: Path) -> None:
    spec = json.dumps({"model_dir": str(model_dir), "seq": seq, "limit_bytes": int(limit_gb * GB), "steps": steps,
                       "batches": batches})
    done = subprocess.run([sys.executable, __file__, "--warm-child", spec], check=False, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "MEMFIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"estimating process exited {done.returncode}: {done.stderr.strip()[-2000:]}")


def traces(cache: Path) -> int:
    """How many traced cuts the cache holds: a process that adds one had to trace."""
    return sum(1 for _ in (cache / "estimate" / "trace").glob("*.json"))


# --- the truth: fresh processes ----------------------------------------------------------------------------------

def measure(model_dir: Path, seq: int, limit_gb: float, steps: int, batch: int, cache: Path) -> dict:
    """One batch in one fresh process: memfit's trial child, with the config, limit and steps of a probe trial."""
    from memfit.probe.trial import TrialSpec, run_trial

    limit = int(limit_gb * GB)
    spec = TrialSpec(str(model_dir), data_path(), "cpu", trial_config(seq, batch, steps, limit / GB), limit)
    with tempfile.TemporaryDirectory() as tmp:
        trial = run_trial(spec, Path(tmp) / "trial", steps=steps, timeout_s=600,
                          env={"MEMFIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    if trial.status == "error":
        raise RuntimeError(f"re-measurement of batch {batch} failed: {trial.detail}")
    return {"peak_bytes": trial.peak_bytes, "usable": trial.usable(limit, MARGIN),
            "stopped": trial.steps_done < steps, "wall_s": trial.wall_s}


def remeasure(model_dir: Path, seq: int, limit_gb: float, steps: int, batches: list[int], repeats: int,
              cache: Path, tag: str) -> dict[int, list[dict]]:
    """Every batch `repeats` times, interleaved: round r measures each batch once."""
    runs: dict[int, list[dict]] = {batch: [] for batch in batches}
    total, done = repeats * len(batches), 0
    for _ in range(repeats):
        for batch in batches:
            before = traces(cache)
            run = measure(model_dir, seq, limit_gb, steps, batch, cache)
            run["traced"] = traces(cache) > before
            runs[batch].append(run)
            done += 1
            notes = ((" (stopped early)" if run["stopped"] else "")
                     + (" (traced: cache missed)" if run["traced"] else ""))
            print(f"  {tag} re-measure {done}/{total}: batch {batch} -> {run['peak_bytes'] / MB:.1f} MB{notes}, "
                  f"{'usable' if run['usable'] else 'not usable'} "
                  f"({run['wall_s']:.0f} s)", flush=True)
    return runs


def summary(runs: list[dict]) -> dict:
    peaks = [run["peak_bytes"] for run in runs]
    return {"median": statistics.median(peaks), "min": min(peaks), "max": max(peaks),
            "usable": sum(run["usable"] for run in runs), "n": len(runs), "stopped": any(r["stopped"] for r in runs)}


def verdict(chosen: dict, above: dict) -> str:
    """Strict only where every re-measurement agrees; otherwise the batch sits within the noise of the cut-off."""
    if chosen["usable"] == 0:
        return "too large: chosen batch not usable"
    if above["usable"] == above["n"] and chosen["usable"] == chosen["n"]:
        return "left a batch on the table: chosen + 1 usable"
    if chosen["usable"] == chosen["n"] and above["usable"] == 0:
        return "largest usable"
    return (f"within noise: chosen usable in {chosen['usable']}/{chosen['n']}, chosen + 1 in "
            f"{above['usable']}/{above['n']}")


# --- the report --------------------------------------------------------------------------------------------------

def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def tried(trials: list[dict]) -> str:
    """Batches in order: ✗ unusable, † stopped before its last step (the probe's guard or kill)."""
    return ", ".join(f"{t['batch_size']}" + ("" if t["usable"] else "✗") + ("†" if t.get("stopped") else "")
                     for t in trials)


def peak_cell(s: dict) -> str:
    low = "≥" if s["stopped"] else ""  # a process stopped at the limit: its peak is a lower bound
    return f"{low}{s['median'] / MB:.1f} ({s['min'] / MB:.1f}–{s['max'] / MB:.1f})"


def markdown(results: list[dict], args, machine: dict) -> str:
    limits = ", ".join(f"{r['label']} seq {r['seq']}: {r['limit_gb']} GB (usable: peak ≤ "
                       f"{r['limit_gb'] * GB / (1 + MARGIN) / MB:.1f} MB)" for r in results)
    command = COMMAND + ("" if args.steps == 6 else f" --steps {args.steps}") + \
        ("" if args.repeats == 3 else f" --repeats {args.repeats}") + (" --quick" if args.quick else "")
    busy = max(machine["load_before"], machine["load_after"]) > machine["cores"]
    all_runs = [run for r in results for batch_runs in r["runs"].values() for run in batch_runs]
    traced = sum(run["traced"] for run in all_runs)
    baseline_traced = sum(r["baseline"]["traced"] for r in results)
    lines = [
        "## memfit probe vs in-process doubling + bisection",
        "",
        (f"Measured with `{command}` on {machine['cpu']} ({machine['cores']} cores), {machine['os']}, torch "
         f"{machine['torch']}; load average (1 min) {machine['load_before']:.2f} before, "
         f"{machine['load_after']:.2f} after"
         + (" (more than the cores: other jobs ran, wall times are not a quiet machine's)" if busy else "")
         + f"; {machine['total_s'] / 60:.1f} min in all. LoRA r16 fp32 on "
         f"`demo.jsonl`, {args.steps} training steps per trial everywhere (Lightning's default is 3), margin "
         f"{MARGIN}. Limits are `--max-memory` values in GB of 2^30 bytes: {limits}."),
        "",
        ("**The two searches.** `memfit probe --json` runs as its own process with an empty `MEMFIT_CACHE`; each "
         "of its trials is a fresh child process, which finds the estimator's cache filled by the probe itself (it "
         "estimates each batch before it tries it). The baseline is one child process that loads the model once (memfit's "
         "Trainer in trial mode: the same model, data and rows per batch as a probe trial, its start-up estimate "
         "found in a cache of the benchmark's own, filled for it beforehand"
         + (f"; {baseline_traced} baseline process(es) still traced" if baseline_traced else "")
         + ") and tries batches "
         f"in-process with the control flow of Lightning's `BatchSizeFinder(mode=\"binsearch\")`: start at {START}, "
         "double after each success until a trial fails, then bisect between the last success and the first "
         "failure until they are 1 apart, and answer the last success. Unlike Lightning, a baseline trial fails "
         f"when its peak RSS × {1 + MARGIN:.2f} passes the limit (the probe's rule, read after the trial's steps: on "
         "CPU an artificial limit raises no out-of-memory error); the peak is reset before each trial "
         "(/proc/self/clear_refs), but memory the process kept from earlier trials counts in it; before each trial "
         "it runs gc.collect() and malloc_trim(0), as Lightning runs gc.collect() and torch.cuda.empty_cache(). "
         "✗ marks a batch the side found unusable, † a probe trial stopped before its last step. \"Own reading\" "
         "is the peak the side itself measured for its choice. Wall time is the whole process, model loading "
         "included."),
        "",
        ("| model | seq | limit | method | trials | batches tried (in order) | wall time s | chosen "
         "| own reading (MB) |"),
        "|---|---:|---:|---|---:|---|---:|---:|---:|",
    ]
    for r in results:
        for side in (r["probe"], r["baseline"]):
            own = f"{side['chosen_peak'] / MB:.1f}" if side["chosen_peak"] else "–"
            lines.append(f"| {r['label']} | {r['seq']} | {r['limit_gb']} GB | {side['method']} | "
                         f"{len(side['trials'])} | {tried(side['trials'])} | {side['wall_s']:.1f} | "
                         f"{side['chosen']} | {own} |")
    lines += [
        "",
        (f"**The truth**, from re-measurements only: each side's chosen batch and chosen + 1 (literally + 1: both "
         f"searches run over every integer batch, so that is the next batch up in either grid, the one \"largest "
         f"usable\" claims does not fit), each in {args.repeats} fresh processes (memfit's trial child started by "
         "the benchmark with its own spec and run directory, the probe trials' config, limit and steps; none of "
         "the probe's recorded results is used), interleaved round by round. Like the probe's trials (and a run "
         "after a probe) they find the estimator's cache filled, by a separate estimating process beforehand, "
         "so none traces the model at start as a process with an empty cache does"
         + (f" ({traced} of {len(all_runs)} still traced)" if traced else f" (none of the {len(all_runs)} traced)")
         + ". Peaks in MB (2^20 bytes): median "
         "(min–max) of the processes; ≥ where a process was stopped at the limit (a lower bound). \"usable\": in "
         f"how many processes the batch ran every step with peak × {1 + MARGIN:.2f} ≤ limit. The verdict is "
         "strict only where every process agrees, else \"within noise\"."),
        "",
        ("| model | seq | limit | method | chosen | peak of chosen | usable | peak of chosen + 1 | usable "
         "| verdict |"),
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        for side in (r["probe"], r["baseline"]):
            if not side["chosen"]:  # nothing fits: only batch 1 is re-measured
                above = r["truth"][1]
                lines.append(f"| {r['label']} | {r['seq']} | {r['limit_gb']} GB | {side['method']} | 0 | – | – | "
                             f"{peak_cell(above)} | {above['usable']}/{above['n']} | "
                             f"{'batch 1 usable' if above['usable'] else 'nothing usable'} |")
                continue
            chosen, above = r["truth"][side["chosen"]], r["truth"][side["chosen"] + 1]
            lines.append(f"| {r['label']} | {r['seq']} | {r['limit_gb']} GB | {side['method']} | {side['chosen']} | "
                         f"{peak_cell(chosen)} | {chosen['usable']}/{chosen['n']} | {peak_cell(above)} | "
                         f"{above['usable']}/{above['n']} | {verdict(chosen, above)} |")
    lines.append("")
    for r in results:
        probe, baseline = r["probe"], r["baseline"]
        lines.append(f"- {r['label']}, seq {r['seq']}, {r['limit_gb']} GB: {len(probe['trials'])} probe trials "
                     f"against {len(baseline['trials'])} baseline trials ({probe['wall_s']:.0f} s against "
                     f"{baseline['wall_s']:.0f} s); chosen {probe['chosen']} against {baseline['chosen']}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="training steps per trial, everywhere")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per re-measured batch")
    parser.add_argument("--quick", action="store_true", help="only the first case")
    parser.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"))
    parser.add_argument("--save", help="also write every measurement (each process's peak) to this JSON file")
    parser.add_argument("--baseline-child", help=argparse.SUPPRESS)
    parser.add_argument("--warm-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warm_child:
        spec = json.loads(args.warm_child)
        warm_child(spec["model_dir"], spec["seq"], spec["limit_bytes"], spec["steps"], spec["batches"])
        return
    if args.baseline_child:
        spec = json.loads(args.baseline_child)
        print(json.dumps(baseline_child(spec["model_dir"], spec["seq"], spec["limit_bytes"], spec["steps"])))
        return
    if args.repeats < 3:
        parser.error("--repeats must be >= 3")

    from memfit.models import init_model

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    results = []
    cases = CASES[:1] if args.quick else CASES
    with tempfile.TemporaryDirectory() as tmp:
        for number, (label, arch, extra, seq, limit_gb) in enumerate(cases, 1):
            tag = f"[case {number}/{len(cases)}: {label} seq {seq} {limit_gb} GB]"
            model_dir = Path(tmp) / f"{arch}-{number}"
            init_model(arch, model_dir, **extra)
            print(f"{tag} memfit probe ...", flush=True)
            probe_cache = Path(tmp) / f"probe-cache-{number}"  # empty: no journal or profile of an earlier run
            probe = run_probe(model_dir, seq, limit_gb, args.steps, probe_cache)
            print(f"{tag} probe: {tried(probe['trials'])} -> {probe['chosen']} in {probe['wall_s']:.0f} s; "
                  + "; ".join(f"{t['batch_size']}: {(t['peak_bytes'] or 0) / MB:.1f} MB" for t in probe["trials"]),
                  flush=True)
            cache = Path(tmp) / f"cache-{number}"  # the benchmark's own, not the probe's
            warm_cache(model_dir, seq, limit_gb, args.steps, [1], cache)
            print(f"{tag} baseline ...", flush=True)
            before = traces(cache)
            baseline = run_baseline(model_dir, seq, limit_gb, args.steps, cache)
            baseline["traced"] = traces(cache) > before
            print(f"{tag} baseline: {tried(baseline['trials'])} -> {baseline['chosen']} in "
                  f"{baseline['wall_s']:.0f} s{' (traced: cache missed)' if baseline['traced'] else ''}", flush=True)
            batches = sorted({side["chosen"] + up for side in (probe, baseline) for up in (0, 1)} - {0})
            gc.collect()
            warm_cache(model_dir, seq, limit_gb, args.steps, batches, cache)
            runs = remeasure(model_dir, seq, limit_gb, args.steps, batches, args.repeats, cache, tag)
            truth = {batch: summary(batch_runs) for batch, batch_runs in runs.items()}
            results.append({"label": label, "seq": seq, "limit_gb": limit_gb, "probe": probe, "baseline": baseline,
                            "truth": truth, "runs": runs})
            if args.save:  # after every case: what a killed run measured is kept
                Path(args.save).write_text(json.dumps(results, indent=1))
            for side in (probe, baseline):
                if side["chosen"]:
                    print(f"{tag} {side['method']}: chosen {side['chosen']}: "
                          f"{verdict(truth[side['chosen']], truth[side['chosen'] + 1])}", flush=True)
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "os": f"{platform.system()} {platform.release()}",
               "torch": torch.__version__, "load_before": load_before, "load_after": os.getloadavg()[0],
               "total_s": time.perf_counter() - started}
    text = markdown(results, args, machine)
    print(text)
    print(f"total {machine['total_s']:.0f} s")
    if args.save:
        Path(args.save).write_text(json.dumps({"machine": machine, "results": results}, indent=1))
    if args.write:
        write_section(Path(args.out), MARK, text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
