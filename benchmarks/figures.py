"""The figures README.md and docs/*.md quote that no other benchmark produces, one subcommand each.

    python benchmarks/figures.py SUBCOMMAND [--write] [--out docs/benchmarks.md]
    python benchmarks/figures.py all --write

Subcommands (each writes its own `<!-- figures-NAME -->` section of docs/benchmarks.md with --write):
  loading   peak RSS of loading vs the estimator's loading peak: qwen/gpt2 shapes stored fp32 and bf16, LoRA, QLoRA
  mmap      RSS at each step end with glibc's default (dynamic) mmap threshold and with memfit's fixed one
  padding   padding tokens per real token with and without --group-by-length (no training: the trainer's batching)
  compile   memfit train --compile vs eager (tiny model, LoRA, batch 8 x 128): first step, later steps, process wall
  compile-full  --compile and the guard's sampler thread vs eager on full-depth smollm2-135m (train_vs_hf's conditions)
  estimate  wall and CPU time of `memfit estimate` processes (repeats: min/median/max) and the figures they print
  sandbox   the code sandbox's start cost (a one-line program, repeats) and a fork bomb against a process limit
  report    memfit report: render time in a process that has torch loaded, as `memfit report`, and page sizes
  runtime   anonymous RSS of a process with Python+torch+transformers (+ peft) loaded: the estimator's CPU baseline

Timings on a shared machine are noisy: every section gives the load average before and after, and the child
processes' CPU time (user + sys), which other load slows far less than wall time. Memory figures are exact.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from importlib import resources
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from estimate_accuracy import _cpu_name, write_section  # noqa: E402

MB = 1024**2
GB = 1024**3
PY = sys.executable
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
DEMO_DATA = str(resources.files("memfit").joinpath("data/demo.jsonl"))
# benchmarks/train_cpu.py's configuration: the tiny model, LoRA r16, batch 8 x 128 tokens (packed), fp32.
TRAIN_FLAGS = ["--method", "lora", "--seq-len", "128", "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "5",
              "--device", "cpu", "--save-every", "100000", "--memory-report-interval", "100000"]


# ---------------------------------------------------------------------------------------------------------- helpers

def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine() -> str:
    import torch

    return (f"{platform.machine()} {platform.system()}, {_cpu_name()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def timed(command: list[str], env: dict | None = None, cwd: str | None = None, check: bool = True) -> dict:
    """Run `command` to its end: wall time, its CPU time (user + sys, children included) and its output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env or ENV, cwd=cwd)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if check and done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "stdout": done.stdout, "stderr": done.stderr, "rc": done.returncode}


def spread(values: list[float], digits: int = 1, unit: str = " s") -> str:
    """min / median / max (n) of a list; one value alone."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}{unit}"
    return (f"{min(values):.{digits}f} / {statistics.median(values):.{digits}f} / {max(values):.{digits}f}{unit} "
            f"(n={len(values)})")


def header(title: str, name: str, load_before: str, what: str) -> list[str]:
    return [f"## {title}", "",
            f"Measured with `python benchmarks/figures.py {name} --write` on {date.today().isoformat()}, "
            f"{machine()}; load average {load_before} before, {loadavg()} after ({os.cpu_count()} cores shared with "
            "other work). "
            + what, ""]


def tiny_model(scratch: Path, preset: str = "tiny", dtype: str = "fp32", layers: int | None = None) -> Path:
    from memfit.models import init_model

    out = scratch / f"{preset}-{dtype}-{layers}"
    if not (out / "config.json").exists():
        init_model(preset, out, dtype=dtype, num_layers=layers)
    return out


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------- loading

LOAD_MODELS = [("qwen2.5-0.5b", 4), ("gpt2", 6)]
LOAD_CASES = [  # (model, method, dtype)
    *[(m, "lora", d) for m, _ in LOAD_MODELS for d in ("fp32", "bf16")],
    ("qwen2.5-0.5b", "qlora", "fp32"), ("qwen2.5-0.5b", "qlora", "bf16"),
]
# The first half of memfit.estimate.measure.run_steps (the estimate-accuracy child): load as training loads, build
# the optimizer, read the peak. No training step: the step's peak is what benchmarks/estimate_accuracy.py measures.
_LOAD_CHILD = """
import json, sys
from pathlib import Path
import torch
from memfit.allocator import fix_mmap_threshold
from memfit.config import TrainConfig
from memfit.guard.sampler import peak_rss_bytes, rss_bytes
from memfit.precision import resolve_precision
from memfit.train.model import load_model
from memfit.train.optim import build_optimizer
fix_mmap_threshold()
config = TrainConfig(**json.loads(sys.argv[2]))
precision = resolve_precision(config.dtype, "cpu")
torch.manual_seed(config.seed)
baseline = rss_bytes()
model = load_model(Path(sys.argv[1]), config, precision, "cpu")
model.train()
optimizer = build_optimizer(config.optimizer, model.parameters(), config.lr)
print(json.dumps({"baseline_rss_bytes": baseline, "load_peak_rss_bytes": peak_rss_bytes(),
                  "after_load_rss_bytes": rss_bytes()}))
"""


def fig_loading(args) -> str:
    from transformers import AutoConfig

    from memfit.config import TrainConfig
    from memfit.estimate.memory import Hardware, estimate_memory

    load0 = loadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset, layers in LOAD_MODELS:
            for stored in ("fp32", "bf16"):
                model_dir = tiny_model(Path(tmp), preset, stored, layers)
                size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
                hf_config = AutoConfig.from_pretrained(model_dir)
                for model, method, dtype in LOAD_CASES:
                    if model != preset:
                        continue
                    case = dict(method=method, dtype=dtype, batch_size=1, seq_len=64)
                    estimate = estimate_memory(hf_config, TrainConfig(**case), Hardware("cpu", 1 << 40))
                    try:
                        done = subprocess.run([PY, "-c", _LOAD_CHILD, str(model_dir), json.dumps(case)], env=ENV,
                                              capture_output=True, text=True, timeout=args.timeout, check=True)
                        measured = json.loads(done.stdout.strip().splitlines()[-1])
                    except subprocess.TimeoutExpired:
                        measured = None
                    row = dict(model=f"{preset} ({layers} layers)", stored=stored, size=size,
                               converts=stored != dtype, method=method, dtype=dtype, measured=measured,
                               est_load=estimate.load_peak_bytes, est_total=estimate.total_bytes)
                    rows.append(row)
                    print(preset, stored, method, dtype, measured, estimate.load_peak_bytes, flush=True)
    lines = header("Loading peaks (file dtype vs training dtype)", "loading", load0,
                   "Each row: a random-init model of that shape written by `memfit init-model` in the file dtype, "
                   "loaded in a fresh child as training loads it (`memfit.train.model.load_model`, the optimizer "
                   "built; the first half of the estimate-accuracy child, memfit.estimate.measure). Baseline = the "
                   "child's RSS before loading; load peak = its `VmHWM` after. The estimator's loading peak is "
                   "`load_peak_bytes` for batch 1 × 64 (0: no dtype conversion, so no loading peak of its own); "
                   "its error is against the measured load peak. The estimate's total is the larger of that and "
                   "the training step at batch 1 × 64: what `memfit estimate` reports.")
    lines += ["| model | file | method | dtype | converts | baseline MB | load peak MB | load − baseline MB | "
              "estimate: load MB | error | estimate: total MB |", "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = (f"| {r['model']} | {r['stored']}, {r['size'] / MB:,.0f} MB | {r['method']} | {r['dtype']} | "
                f"{'yes' if r['converts'] else 'no'} |")
        m = r["measured"]
        if m is None:
            lines.append(f"{head} timed out after {args.timeout:.0f} s | | | {r['est_load'] / MB:,.0f} | | "
                         f"{r['est_total'] / MB:,.0f} |")
            continue
        load, base = m["load_peak_rss_bytes"], m["baseline_rss_bytes"]
        error = f"{(r['est_load'] - load) / load * 100:+.1f}%" if r["est_load"] else "–"
        lines.append(f"{head} {base / MB:,.0f} | {load / MB:,.0f} | {(load - base) / MB:,.0f} | "
                     f"{r['est_load'] / MB:,.0f} | {error} | {r['est_total'] / MB:,.0f} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------- mmap

MMAP_CASE = dict(method="lora", dtype="fp32", batch_size=4, seq_len=512)
_NO_FIX = ("import json, sys; import memfit.allocator as a; a.fix_mmap_threshold = lambda *x, **k: False; "
           "from memfit.estimate.measure import run_steps; "
           "print(json.dumps(run_steps(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), 'cpu')))")


def fig_mmap(args) -> str:
    from memfit.estimate.measure import measure_in_child

    load0 = loadavg()
    steps = 3
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny_model(Path(tmp), "smollm2-135m", "fp32", 8)
        for pair in range(args.pairs):
            for fixed in (False, True):
                if fixed:
                    measured = measure_in_child(model_dir, MMAP_CASE, steps=steps)
                else:
                    done = timed([PY, "-c", _NO_FIX, str(model_dir), json.dumps(MMAP_CASE), str(steps)])
                    measured = json.loads(done["stdout"].strip().splitlines()[-1])
                results.append((fixed, measured))
                print(f"pair {pair + 1} {'fixed  ' if fixed else 'default'} step-end RSS "
                      f"{[round(b / MB) for b in measured['step_rss_bytes']]} MB, "
                      f"peak {measured['peak_rss_bytes'] / MB:.0f} MB",
                      flush=True)
    lines = header("RSS with glibc's default mmap threshold and with memfit's", "mmap", load0,
                   f"smollm2-135m's shape cut to 8 layers, LoRA r16 fp32, batch 4 × 512, {steps} steps in a fresh "
                   "child (memfit.estimate.measure); 'default' is the same child with `memfit.allocator."
                   "fix_mmap_threshold` made a no-op, 'fixed' is what training does (`M_MMAP_THRESHOLD` 1 MiB). "
                   "Runs alternate.")
    lines += ["| run | glibc mmap threshold | RSS at each step end (MB) | peak RSS (MB) |", "|---:|---|---|---:|"]
    for i, (fixed, m) in enumerate(results):
        lines.append(f"| {i // 2 + 1} | {'fixed 1 MiB (memfit)' if fixed else 'default (dynamic)'} | "
                     f"{', '.join(f'{b / MB:,.0f}' for b in m['step_rss_bytes'])} | {m['peak_rss_bytes'] / MB:,.0f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------- padding

def _padding(lengths: list[int], step_rows: int, micro: int, grouped: bool, seed: int = 0) -> tuple[int, int]:
    """(real tokens, padding tokens) over one epoch, batched as the trainer batches: RowOrder over the step's rows,
    each step sorted longest first and cut into micro-batches, each padded to its longest row (data.collate)."""
    from memfit.data import RowOrder

    order = RowOrder(lengths, seed, step_rows, grouped)
    real = pad = 0
    for start in range(0, math.ceil(len(lengths) / step_rows) * step_rows, step_rows):  # the trainer's steps
        rows = sorted((lengths[i] for i in order.rows(start, step_rows)), reverse=True)
        for i in range(0, len(rows), micro):
            chunk = rows[i:i + micro]
            real += sum(chunk)
            pad += max(chunk) * len(chunk) - sum(chunk)
    return real, pad


def fig_padding(args) -> str:
    from transformers import AutoTokenizer

    from memfit.data import build_dataset
    from train_vs_hf import make_data

    load0 = loadavg()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(str(tiny_model(Path(tmp))))
        cases = []
        for samples in (96, 2000):
            path = Path(tmp) / f"gen-{samples}.jsonl"
            make_data(path, samples)
            cases.append((f"benchmarks/train_vs_hf.py's generated prompt/completion data, {samples} samples", path,
                          512, 4, 2))
        cases.append(("the built-in demo.jsonl (text), `--no-packing`", Path(DEMO_DATA), 128, 8, 1))
        for label, path, seq_len, micro, accum in cases:
            dataset = build_dataset(path, tokenizer, seq_len, packing=False)
            lengths = [len(row.input_ids) for row in dataset.rows]
            off = _padding(lengths, micro * accum, micro, grouped=False)
            on = _padding(lengths, micro * accum, micro, grouped=True)
            results.append((label, len(lengths), seq_len, micro, accum, off, on))
            print(label, off, on, flush=True)
    lines = header("Padding with and without --group-by-length", "padding", load0,
                   "No training: one epoch of each file batched as `memfit train --no-packing` batches it "
                   "(`RowOrder`, seed 0; each step's rows sorted longest first and cut into micro-batches, each "
                   "padded to its longest row). Padding share = padding tokens / real tokens.")
    lines += ["| data | rows | seq len | micro-batch × accum | padding share, --no-group-by-length | "
              "padding share, --group-by-length | padding cut by |", "|---|---:|---:|---|---:|---:|---:|"]
    for label, n, seq_len, micro, accum, (r0, p0), (r1, p1) in results:
        cut = f"{p0 / p1:.1f}×" if p1 else "all of it"
        lines.append(f"| {label} | {n:,} | {seq_len} | {micro} × {accum} | {p0 / r0:.1%} | {p1 / r1:.1%} | {cut} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------- packing

def _greedy_file_order(lengths: list[int], seq_len: int, split: bool) -> tuple[int, int]:
    """(rows, real tokens) of memfit's packing before issue 18, the common greedy packer: long text cut into
    seq_len pieces, then each piece in file order joins the current row if it fits, else opens a new one."""
    pieces = []
    for length in lengths:
        pieces += ([min(seq_len, length - start) for start in range(0, length, seq_len)] if split
                   else [min(seq_len, length)])
    rows, used = 0, seq_len
    for piece in pieces:
        if used + piece > seq_len:
            rows, used = rows + 1, 0
        used += piece
    return rows, sum(pieces)


def fig_packing(args) -> str:
    from transformers import AutoTokenizer

    from memfit.data import build_dataset
    from memfit.data.formats import tokenize_record
    from memfit.data.jsonl import read_records
    from train_vs_hf import make_data, make_text_data

    load0 = loadavg()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(str(tiny_model(Path(tmp))))
        text = Path(tmp) / "text.jsonl"
        described = make_text_data(text, documents=400)
        pairs = Path(tmp) / "pairs.jsonl"
        make_data(pairs, 2000)
        cases = [("the built-in demo.jsonl (text)", Path(DEMO_DATA), 128, True),
                 ("the built-in demo.jsonl (text)", Path(DEMO_DATA), 512, True),
                 (f"generated plain text ({described})", text, 256, True),
                 (f"generated plain text ({described})", text, 2048, True),
                 ("benchmarks/train_vs_hf.py's prompt/completion data, 2000 samples, `--packing`", pairs, 512, False),
                 ("benchmarks/train_vs_hf.py's prompt/completion data, 2000 samples, `--packing`", pairs, 2048, False)]
        for label, path, seq_len, is_text in cases:
            lengths = [len(tokenize_record(record, tokenizer).input_ids) for record in read_records(path)]
            old_rows, old_tokens = _greedy_file_order(lengths, seq_len, split=is_text)
            dataset = build_dataset(path, tokenizer, seq_len, packing=True)
            rows = len(dataset.rows)
            results.append((label, seq_len, old_rows, old_tokens / (old_rows * seq_len), rows,
                            dataset.stats.tokens / (rows * seq_len)))
            print(results[-1], flush=True)
    lines = header("How full packed rows are", "packing", load0,
                   "No training: each file laid out as `memfit train --packing` lays it out (`build_dataset`, the "
                   "tiny model's tokenizer). Fill = real tokens / (rows × seq len). 'Greedy, file order' is memfit's "
                   "packing before (long text cut into seq-len pieces, each piece joins the current row if it fits); "
                   "now plain text fills every row, a document that does not fit going on in the next row, and "
                   "samples that must stay whole (prompt/completion, chat) are packed best-fit decreasing. Documents "
                   "stay isolated either way (one segment each, their own positions and attention).")
    lines += ["| data | seq len | rows, greedy file order | fill | rows, now | fill |",
              "|---|---:|---:|---:|---:|---:|"]
    for label, seq_len, old_rows, old_fill, rows, fill in results:
        lines.append(f"| {label} | {seq_len} | {old_rows:,} | {old_fill:.1%} | {rows:,} | {fill:.1%} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------- compile

def fig_compile(args) -> str:
    load0 = loadavg()
    steps = args.steps or 30
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny_model(Path(tmp))
        for layout in (["--packing"], ["--no-packing"]):
            for mode in ("--no-compile", "--compile"):
                out = Path(tmp) / f"run{len(runs)}"
                done = timed([PY, "-m", "memfit", "train", "--model", str(model_dir), "--data", DEMO_DATA,
                              "--output-dir", str(out), "--max-steps", str(steps), *TRAIN_FLAGS, *layout, mode])
                times = [m["step_time_s"] for m in metrics(out)]
                runs.append(dict(layout=layout[0], mode=mode, wall=done["wall_s"], cpu=done["cpu_s"], times=times))
                print(layout[0], mode, f"wall {done['wall_s']:.0f} s, step 1 {times[0]:.2f} s, later",
                      [round(t, 2) for t in times[1:]], flush=True)
    lines = header("--compile vs eager on CPU", "compile", load0,
                   f"`memfit train` of the tiny model on demo.jsonl, LoRA r16, batch 8 × 128 tokens, fp32 "
                   f"(benchmarks/train_cpu.py's configuration), {steps} steps, a fresh process each, eager then "
                   "compiled; step times are "
                   "`step_time_s` from metrics.jsonl. Packed rows all have one shape; unpacked rows vary in length "
                   "(new shapes).")
    lines += ["| rows | mode | step 1 s | steps 2..N: min / median / max s | steps 2..N over 1 s | process wall s | "
              "process CPU s |", "|---|---|---:|---|---:|---:|---:|"]
    for r in runs:
        later = r["times"][1:]
        lines.append(f"| {r['layout'].lstrip('-')} | {r['mode'].lstrip('-')} | {r['times'][0]:.2f} | "
                     f"{spread(later, 3, '')} | {sum(t > 1 for t in later)} | {r['wall']:.0f} | {r['cpu']:.0f} |")
    return "\n".join(lines) + "\n"


def fig_compile_full(args) -> str:
    """--compile and the guard's sampler thread on a full-depth model, in train_vs_hf.py's conditions (its memfit
    command, its plain-text data, one thread): three modes in rotated order, `args.repeats` rounds."""
    from train_vs_hf import run_memfit, smollm2_and_text

    load0 = loadavg()
    steps = args.steps or 12
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # run_memfit's children inherit it
    modes = {"eager (defaults: guard thread every 0.1 s)": ["--no-compile"],
             "eager, guard thread off (`--memory-sample-interval 0`)": ["--no-compile", "--memory-sample-interval", "0"],
             "`--compile`": ["--compile"]}
    if args.figure == "guard-thread":  # the guard's thread alone, more rounds: its cost is within run-to-run noise
        modes.pop("`--compile`")
    results: dict[str, list[dict]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, data, described = smollm2_and_text(work, layers=30)
        names = list(modes)
        for round_index in range(args.repeats):
            for mode in names[round_index % len(names):] + names[:round_index % len(names)]:
                run = run_memfit(model_dir, data, work, steps, 512, 1, ["--packing", *modes[mode]])
                if "failed" in run:
                    raise SystemExit(f"{mode}: {run['failed']}")
                later = run["steps"][2:]  # steps 1-2: compilation, allocator and library warm-up
                tokens_per_s = sum(s["tokens"] for s in later) / sum(s["step_time_s"] for s in later)
                results[mode].append(dict(first_s=run["steps"][0]["step_time_s"], tokens_per_s=tokens_per_s,
                                          wall_s=run["wall_s"], cpu_s=run["cpu_s"],
                                          guard_cpu_s=run.get("guard_thread_cpu_s"),
                                          peak_rss_bytes=run["peak_rss_bytes"], other_load=run["other_load_cores"]))
                print(mode, {k: round(v, 2) if isinstance(v, float) else v for k, v in results[mode][-1].items()},
                      flush=True)
    base = names[0]
    title = ("The guard's thread on a full-depth model (CPU)" if args.figure == "guard-thread"
             else "--compile and the guard's thread on a full-depth model (CPU)")
    lines = header(title, args.figure, load0,
                   f"`memfit train` of smollm2-135m's full shapes (30 layers, random init) on {described} "
                   f"(benchmarks/train_vs_hf.py's data and command: LoRA r16 all-linear, fp32, batch 1 × 512 packed, "
                   f"no gradient checkpointing), {steps} steps, a fresh process per run, the three modes in rotated "
                   f"order for {args.repeats} rounds, one thread (`OMP_NUM_THREADS=1`, run as `taskset -c 1 python "
                   f"benchmarks/figures.py {args.figure} --repeats {args.repeats} --write` with other work kept on "
                   "the other core). tokens/s "
                   "counts steps 3..N (step 1 holds the compilation). Ratios are per round against the first mode. "
                   "Guard thread CPU: the sampler thread's own CPU time (`time.thread_time` in the thread, run.json's "
                   "`guard_thread_cpu_s`) over the process's CPU time (os.wait4), the median over the runs.")
    lines += ["| mode | step 1 s | tokens/s, steps 3..N: min / median / max | ÷ eager per round | process wall s | "
              "guard thread CPU | peak RSS MB | other load, cores |", "|---|---:|---|---|---:|---:|---:|---:|"]
    for mode in names:
        rows = results[mode]
        ratios = [r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(rows, results[base])]
        loads = [r["other_load"] for r in rows if r["other_load"] is not None]
        load = f"{max(loads):.2f}" if loads else "?"
        shares = [r["guard_cpu_s"] / r["cpu_s"] for r in rows if r.get("guard_cpu_s") is not None and r["cpu_s"]]
        guard = f"{statistics.median(shares):.3%}" if shares else "?"
        lines.append(f"| {mode} | {spread([r['first_s'] for r in rows], 1, '')} | "
                     f"{spread([r['tokens_per_s'] for r in rows], 1, '')} | "
                     f"{', '.join(f'{x:.3f}' for x in ratios)} | {statistics.median(r['wall_s'] for r in rows):.0f} | "
                     f"{guard} | {statistics.median(r['peak_rss_bytes'] for r in rows) / MB:,.0f} | {load} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------- estimate

ESTIMATE_CASES = [  # (label, flags, repeats or None for args.repeats)
    ("tiny, LoRA, defaults (cpu)", ["--model", "tiny", "--method", "lora"], None),
    ("llama-3.1-8b, LoRA, defaults (cpu)", ["--model", "llama-3.1-8b", "--method", "lora"], None),
    ("llama-3.1-8b, LoRA, batch 8 × 2048, bf16, cuda 80 GB",
     ["--model", "llama-3.1-8b", "--method", "lora", "--batch-size", "8", "--seq-len", "2048", "--dtype", "bf16",
      "--device", "cuda", "--memory-gb", "80"], None),
    ("the same, --no-chunked-loss",
     ["--model", "llama-3.1-8b", "--method", "lora", "--batch-size", "8", "--seq-len", "2048", "--dtype", "bf16",
      "--device", "cuda", "--memory-gb", "80", "--no-chunked-loss"], 1),
]


def fig_estimate(args) -> str:
    load0 = loadavg()
    rows = []
    for label, flags, repeats in ESTIMATE_CASES:
        runs, out = [], None
        with tempfile.TemporaryDirectory() as cache:  # each case starts from an empty memfit cache
            for _ in range(repeats or args.repeats):
                done = timed([PY, "-m", "memfit", "estimate", *flags, "--no-calibrate", "--json"],
                             env={**ENV, "MEMFIT_CACHE": cache})
                runs.append(done)
                out = json.loads(done["stdout"])
                print(f"{label}: wall {done['wall_s']:.1f} s, cpu {done['cpu_s']:.1f} s", flush=True)
        rows.append((label, flags, runs, out))
    import_only = [timed([PY, "-c", "import memfit.cli, memfit.estimate.memory"]) for _ in range(args.repeats)]
    lines = header("How long `memfit estimate` takes", "estimate", load0,
                   "Each row: `python -m memfit estimate FLAGS --no-calibrate --json` as a fresh process, run "
                   "one after another, the first with an empty `MEMFIT_CACHE`, the next ones with what it left; "
                   "wall and CPU time (user + sys) of the whole process, min / median / max. GB = 2^30 bytes.")
    lines += ["| case | flags | first: wall s | first: CPU s | again: wall s | again: CPU s | params | total GB | "
              "logits GB | fits |", "|---|---|---:|---:|---|---|---:|---:|---:|---|"]
    for label, flags, runs, out in rows:
        again = runs[1:]
        again_wall = spread([r["wall_s"] for r in again], 1, "") if again else "–"
        again_cpu = spread([r["cpu_s"] for r in again], 1, "") if again else "–"
        lines.append(f"| {label} | `{' '.join(flags)}` | {runs[0]['wall_s']:.1f} | {runs[0]['cpu_s']:.1f} | "
                     f"{again_wall} | {again_cpu} | {out['params']:,} | {out['total_bytes'] / GB:,.1f} | "
                     f"{out['breakdown']['logits'] / GB:,.1f} | {'yes' if out['fits'] else 'no'} |")
    lines += ["", "Importing memfit's CLI and estimator alone "
              "(`python -c \"import memfit.cli, memfit.estimate.memory\"`): "
              f"wall {spread([r['wall_s'] for r in import_only])}, CPU {spread([r['cpu_s'] for r in import_only])}."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------- sandbox

_FORKS = """\
import os, time
children = 0
try:
    for _ in range(200):
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        children += 1
except OSError as error:
    print("stopped at", children, type(error).__name__)
"""


def fig_sandbox(args) -> str:
    from memfit.eval.sandbox import Limits, run_python, sandbox_support

    load0 = loadavg()
    support = sandbox_support()
    if not support.available:
        raise SystemExit(f"no sandbox here: {support.reason}")
    walls, outer, cpus = [], [], []
    for _ in range(args.repeats * 7):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        result = run_python("import sys; sys.stdout.write('ok')", Limits(wall_s=20))
        outer.append((time.perf_counter() - started) * 1000)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append((after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000)
        walls.append(result.wall_s * 1000)
        assert result.stdout == "ok", result
    bomb = run_python(_FORKS, Limits(wall_s=10, processes=16))
    unshare = subprocess.run(["unshare", "--version"], capture_output=True, text=True).stdout.strip()
    lines = header("The code sandbox: start cost and the process limit", "sandbox", load0,
                   f"`memfit.eval.sandbox.run_python` as `memfit eval --generate` calls it, as uid {os.geteuid()}, "
                   f"kernel {platform.release()}, {unshare}.")
    lines += ["| measure | value |", "|---|---:|",
              f"| a one-line program, `RunResult.wall_s` (ms): min / median / max | {spread(walls, 0, '')} |",
              f"| the same, the whole `run_python` call, temporary directory included (ms) | {spread(outer, 0, '')} |",
              f"| the same, CPU time of the processes it started (user + sys, ms) | {spread(cpus, 0, '')} |",
              "| a program forking children that sleep, `Limits(processes=16)`: its output | "
              f"{bomb.stdout.strip() or bomb.reason} |"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------- report

_RENDER = ("import sys, time, json; import torch, memfit.train; t0, c0 = time.perf_counter(), time.process_time(); "
           "import memfit.report.plots; t1, c1 = time.perf_counter(), time.process_time(); "
           "from memfit.report import write_report; write_report(sys.argv[1], sys.argv[2]); "
           "t2, c2 = time.perf_counter(), time.process_time(); "
           "print(json.dumps({'import_s': t1 - t0, 'render_s': t2 - t1, 'import_cpu_s': c1 - c0, "
           "'render_cpu_s': c2 - c1}))")


def _long_copy(run: Path, target: Path, steps: int) -> Path:
    """A copy of `run` whose metrics.jsonl repeats its step lines, renumbered, up to `steps` steps."""
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("checkpoints", "final", "report.html"))
    lines = metrics(run)
    with open(target / "metrics.jsonl", "w") as out:
        for step in range(1, steps + 1):
            line = dict(lines[(step - 1) % len(lines)], step=step)
            out.write(json.dumps(line) + "\n")
    return target


def fig_report(args) -> str:
    load0 = loadavg()
    steps = args.steps or 30
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny_model(Path(tmp))
        run = Path(tmp) / "run"
        timed([PY, "-m", "memfit", "train", "--model", str(model_dir), "--data", DEMO_DATA, "--output-dir", str(run),
               "--max-steps", str(steps), *TRAIN_FLAGS])
        long_run = _long_copy(run, Path(tmp) / "long", 10_000)
        results = {}
        for name, path in ((f"{steps} steps", run), ("10,000 steps", long_run)):
            inproc = [json.loads(timed([PY, "-c", _RENDER, str(path), str(Path(tmp) / f"{name}-in.html")])["stdout"]
                                 .strip().splitlines()[-1]) for _ in range(args.repeats)]
            cli = [timed([PY, "-m", "memfit", "report", str(path), "--out", str(Path(tmp) / f"{name}.html")])
                   for _ in range(args.repeats)]
            results[name] = dict(imports=[r["import_s"] for r in inproc], render=[r["render_s"] for r in inproc],
                                 imports_cpu=[r["import_cpu_s"] for r in inproc],
                                 render_cpu=[r["render_cpu_s"] for r in inproc],
                                 wall=[r["wall_s"] for r in cli], cpu=[r["cpu_s"] for r in cli],
                                 size=(Path(tmp) / f"{name}.html").stat().st_size)
            print(name, results[name], flush=True)
    lines = header("Run report: render time and page size", "report", load0,
                   f"A {steps}-step `memfit train` of the tiny model (LoRA, batch 8 × 128), and a copy of its run "
                   "directory whose metrics.jsonl repeats those step lines up to 10,000 steps. 'In a training "
                   "process': a fresh process that has imported torch and memfit.train, timing the import of "
                   "memfit.report.plots (matplotlib) and `write_report` (wall, and the process's CPU time); '`memfit "
                   "report`': the whole CLI process.")
    def mm(values: list[float], digits: int) -> str:  # median (min-max)
        return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

    lines += [f"Median (min-max) of {args.repeats} processes each, in seconds.", "",
              "| run | training process: import of matplotlib, wall | CPU | render + write, wall | CPU | "
              "`memfit report`, wall | CPU | page size |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {mm(r['imports'], 2)} | {mm(r['imports_cpu'], 2)} | {mm(r['render'], 2)} | "
                     f"{mm(r['render_cpu'], 2)} | {mm(r['wall'], 1)} | {mm(r['cpu'], 1)} | "
                     f"{r['size'] / 1024:,.0f} KB |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------- runtime

_ANON = ("import sys, json, torch, transformers\n"
         "from transformers import AutoModelForCausalLM\n"
         "import transformers.models.llama.modeling_llama\n"
         "if sys.argv[1] == 'peft-hidden':\n    from memfit import libraries; libraries.hide_bitsandbytes_from_peft()\n"
         "if sys.argv[1] != 'plain':\n    from memfit.libraries import import_peft; import_peft()\n"
         "x = torch.randn(64, 64, requires_grad=True); (x @ x).sum().backward()\n"
         "status = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
         "print(json.dumps({k: int(status[k].split()[0]) * 1024 for k in ('RssAnon', 'RssFile', 'VmHWM')}))\n")


def fig_runtime(args) -> str:
    from memfit.estimate import memory

    load0 = loadavg()
    readings = {kind: [json.loads(timed([PY, "-c", _ANON, kind])["stdout"]) for _ in range(args.repeats)]
                for kind in ("plain", "peft", "peft-hidden")}
    anon = {kind: statistics.median(r["RssAnon"] for r in rs) for kind, rs in readings.items()}
    files = {kind: statistics.median(r["RssFile"] for r in rs) for kind, rs in readings.items()}
    lines = header("The estimator's CPU process baseline", "runtime", load0,
                   "A fresh process imports torch, transformers and the llama model code and runs a tiny backward "
                   "pass; the second also imports peft (which imports bitsandbytes), the third imports peft with "
                   "bitsandbytes hidden, as a --quant none process does (memfit.libraries). Anonymous and "
                   f"file-backed RSS from /proc/self/status, median of {args.repeats}.")
    lines += ["| process | RssAnon MB | RssFile MB | estimator's constant |", "|---|---:|---:|---|",
              f"| Python + torch + transformers | {anon['plain'] / MB:,.0f} | {files['plain'] / MB:,.0f} | "
              f"`CPU_PROCESS_ANON_BYTES` = {memory.CPU_PROCESS_ANON_BYTES / MB:,.0f} MB |",
              f"| + peft | {anon['peft'] / MB:,.0f} (+{(anon['peft'] - anon['plain']) / MB:,.0f}) | "
              f"{files['peft'] / MB:,.0f} | `CPU_PEFT_IMPORT_BYTES` = +{memory.CPU_PEFT_IMPORT_BYTES / MB:,.0f} MB |",
              f"| + peft, bitsandbytes hidden | {anon['peft-hidden'] / MB:,.0f} "
              f"(+{(anon['peft-hidden'] - anon['plain']) / MB:,.0f}) | {files['peft-hidden'] / MB:,.0f} | "
              f"`CPU_BITSANDBYTES_IMPORT_BYTES` = {memory.CPU_BITSANDBYTES_IMPORT_BYTES / MB:,.0f} MB less (the "
              f"difference of the two peft rows: {(anon['peft'] - anon['peft-hidden']) / MB:,.0f} MB) |"]
    return "\n".join(lines) + "\n"


FIGURES = {"loading": fig_loading, "mmap": fig_mmap, "padding": fig_padding, "packing": fig_packing, "compile": fig_compile,
           "compile-full": fig_compile_full, "guard-thread": fig_compile_full,
           "estimate": fig_estimate, "sandbox": fig_sandbox, "report": fig_report,
           "runtime": fig_runtime}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("figure", choices=[*FIGURES, "all"])
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each timed process (default 3)")
    parser.add_argument("--pairs", type=int, default=1, help="mmap: alternating pairs of runs (default 1)")
    parser.add_argument("--steps", type=int, default=None, help="compile, report: training steps (default 30)")
    parser.add_argument("--timeout", type=float, default=900, help="loading: seconds per child (default 900)")
    parser.add_argument("--write", action="store_true", help="write the section(s) into docs/benchmarks.md")
    parser.add_argument("--out", default=str(HERE.parent / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    for name in FIGURES if args.figure == "all" else [args.figure]:
        args.figure = name  # compile-full and guard-thread share a function; it titles its section by this
        body = FIGURES[name](args)
        print(body, flush=True)
        if args.write:
            write_section(Path(args.out), f"figures-{name}", body)
            print(f"wrote section figures-{name} of {args.out}", flush=True)


if __name__ == "__main__":
    main()
