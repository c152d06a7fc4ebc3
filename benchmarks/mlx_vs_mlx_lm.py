"""memfit train --engine mlx vs mlx_lm.lora (the anchor): tokens/s, peak memory and the loss curve, side by side.

Same model, data, LoRA settings (rank, scale = alpha / rank, dropout, every decoder layer, every linear), optimizer
(AdamW, no weight decay, bias correction), schedule (cosine decay from the peak rate over the run, no warmup),
batch size, sequence length, gradient checkpointing and steps for both. Each run is a fresh child process, one at a
time, the two contenders alternating (memfit first on even repeats, mlx-lm first on odd ones), `--repeats` times.

- memfit: the real CLI, `python -m memfit train --engine mlx ... --no-packing`; per-step figures from its
  metrics.jsonl, MLX's peak (`mx.get_peak_memory()`) from run.json's `peak_mlx_bytes`;
- mlx-lm: this file as a child (`--child SPEC.json`), which calls mlx_lm.lora's own `train_model` (load,
  linear_to_lora_layers, its trainer) with a TrainingCallback that records every step's report (loss, tokens/s,
  `peak_memory`, the same MLX counter).
Both children's peak RSS comes from `os.wait4` (the same call for both).

Tokens/s is the median over the steps after the first two (compilation and warm-up). What is compared: the ratio of
memfit's to mlx-lm's tokens/s (the issue's bar: >= 1.0) and peak memory (<= 1.0), and the loss curves (the data
orders differ: mlx-lm sorts by length and shuffles batches, memfit groups by length within its seeded order, so the
curves agree in level and trend, not step by step).

A third contender, memfit with the guard's sampler thread off (`--memory-sample-interval 0`; the step-end reading
stays), measures the guard's overhead (the issue's bar: <= 1%). A fourth, memfit with glibc's malloc as it comes
(`MEMFIT_MALLOC=none`, as mlx-lm's process has it), measures what memfit's default allocator policy (memfit.allocator:
the mmap threshold fixed at 1 MiB, so the RSS falls back after each step) costs in tokens/s and saves in RSS.

    taskset -c 1 python benchmarks/mlx_vs_mlx_lm.py [--preset smollm2-135m] [--layers N] [--steps 20] [--repeats 3]
        [--json] [--write]
    taskset -c 1 python benchmarks/mlx_vs_mlx_lm.py --same-rows [--no-cache] ... [--write]

`--same-rows` leaves the CLI and the data out: each contender's own training step runs on the same random token rows
(same_rows_child), MLX's peak read after every step; `--no-cache` turns MLX's buffer cache off in both, so every
array counts at its own size.

`--write` puts the table in docs/benchmarks.md (section `mlx-vs-mlx-lm`). Pinned to one core (`taskset -c 1`) with
other work on the other core, the "other load" column shows how much else ran on the benchmark's core.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GB = 1024**3
MB = 1e6  # peak MLX in MB (10^6 bytes): mlx-lm reports its peak in 10^9 bytes

SETTINGS = dict(lora_rank=16, lora_alpha=32, lr=2e-4, batch_size=4, seq_len=256, seed=0, max_grad_norm=0.0)


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def _run(command: list[str], log: Path, env: dict[str, str] | None = None
         ) -> tuple[int, int, float, float | None, float]:
    """(exit code, peak RSS bytes, seconds, other load in cores, CPU seconds) of a child process. The peak is
    wait4's ru_maxrss: the child's exec folds in its parent's RSS there (memfit.guard.sampler), the same parent for
    both contenders."""
    sys.path.insert(0, str(HERE))
    from train_vs_hf import _busy_cpu_s

    busy_before = _busy_cpu_s()
    started = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=_env(env), cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    cpu = usage.ru_utime + usage.ru_stime
    other = (_busy_cpu_s() - busy_before - cpu) / seconds if busy_before is not None else None
    return os.waitstatus_to_exitcode(status), rss, seconds, other, cpu


def full_rows(texts: list[str], tokenizer, seq_len: int) -> list[str]:
    """memfit's demo texts (65-136 tokens each) joined in file order into documents of at least `seq_len` + 1
    tokens, so every row of both contenders is a full `seq_len` wide. With the texts as they are, each batch is as
    wide as its longest row and the peak follows which batches a run happened to draw (memfit takes the longest
    first, mlx-lm shuffles): 8 steps on the tiny model peaked at 44 MB for memfit (width 160 at step 1) and 36 MB
    for mlx-lm (narrower batches), a difference of data order, not of memory use."""
    documents, current, length = [], [], 0
    for text in texts:
        current.append(text)
        length += len(tokenizer(text)["input_ids"])
        if length > seq_len:
            documents.append("\n\n".join(current))
            current, length = [], 0
    return documents


def prepare(work: Path, preset: str, layers: int | None, seq_len: int) -> tuple[Path, Path, Path]:
    """A random-init model of `preset`, memfit's demo data in full rows (full_rows) as memfit's JSONL and as
    mlx-lm's data dir."""
    sys.path.insert(0, str(ROOT / "src"))
    from transformers import AutoTokenizer

    from memfit.models import init_model

    model = work / "model"
    if not model.exists():
        init_model(preset, model, num_layers=layers)
    demo = ROOT / "src" / "memfit" / "data" / "demo.jsonl"
    texts = [json.loads(line)["text"] for line in demo.read_text().splitlines() if line.strip()]
    records = [{"text": text} for text in full_rows(texts, AutoTokenizer.from_pretrained(model), seq_len)]
    data_dir = work / "mlx_lm_data"
    data_dir.mkdir(exist_ok=True)
    lines = "".join(json.dumps(record) + "\n" for record in records)
    (data_dir / "train.jsonl").write_text(lines)
    (data_dir / "valid.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records[:8]))
    memfit_data = work / "train.jsonl"
    memfit_data.write_text(lines)
    return model, memfit_data, data_dir


def run_memfit(model: Path, data: Path, out: Path, steps: int, grad_checkpointing: bool,
               flags: tuple[str, ...] = (), env: dict[str, str] | None = None) -> dict:
    s = SETTINGS
    shutil.rmtree(out, ignore_errors=True)  # --work reused: memfit refuses to start a new run in a run dir
    command = [sys.executable, "-m", "memfit", "train", "--engine", "mlx", "--model", str(model), "--data",
               str(data), "-o", str(out), "--max-steps", str(steps), "--lora-rank", str(s["lora_rank"]),
               "--lora-alpha", str(s["lora_alpha"]), "--lr", str(s["lr"]), "--batch-size", str(s["batch_size"]),
               "--seq-len", str(s["seq_len"]), "--seed", str(s["seed"]), "--max-grad-norm", str(s["max_grad_norm"]),
               "--no-packing", "--save-every", str(10 * steps),
               "--grad-checkpointing" if grad_checkpointing else "--no-grad-checkpointing", *flags]
    code, rss, seconds, other, cpu = _run(command, out.parent / f"{out.name}.log", env)
    if code != 0:
        return {"error": f"exit {code} (see {out.parent / f'{out.name}.log'})"}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    run = json.loads((out / "run.json").read_text())
    return {"losses": [m["loss"] for m in metrics], "tokens_per_s": [m["tokens_per_s"] for m in metrics],
            "peak_mlx_bytes": run.get("peak_mlx_bytes"), "peak_rss_bytes": rss, "seconds": seconds,
            "other_load": other, "guard_cpu_share": (run.get("guard_thread_cpu_s") or 0.0) / cpu}


def run_mlx_lm(model: Path, data_dir: Path, out: Path, steps: int, grad_checkpointing: bool) -> dict:
    for stale in (out, Path(str(out) + ".jsonl")):  # --work reused: the report file is appended to
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    spec = {"model": str(model), "data": str(data_dir), "adapter_path": str(out), "iters": steps,
            "grad_checkpoint": grad_checkpointing, "report": str(out) + ".jsonl", **SETTINGS}
    spec_path = Path(str(out) + ".spec.json")
    spec_path.write_text(json.dumps(spec))
    code, rss, seconds, other, _ = _run([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
                                     Path(str(out) + ".log"))
    if code != 0:
        return {"error": f"exit {code} (see {out}.log)"}
    reports = [json.loads(line) for line in Path(spec["report"]).read_text().splitlines()]
    return {"losses": [r["train_loss"] for r in reports], "tokens_per_s": [r["tokens_per_second"] for r in reports],
            "peak_mlx_bytes": int(max(r["peak_memory"] for r in reports) * 1e9), "peak_rss_bytes": rss,
            "seconds": seconds, "other_load": other}


def child(spec_path: str) -> int:
    """mlx-lm's own LoRA training (mlx_lm.lora.train_model), every step reported to a JSONL file."""
    import types

    import mlx.core as mx
    import numpy as np
    from mlx_lm import load
    from mlx_lm.lora import CONFIG_DEFAULTS, train_model
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import load_dataset

    spec = json.loads(Path(spec_path).read_text())
    steps = spec["iters"]
    args = types.SimpleNamespace(**{
        **CONFIG_DEFAULTS, "model": spec["model"], "data": spec["data"], "train": True,
        "adapter_path": spec["adapter_path"], "iters": steps, "batch_size": spec["batch_size"],
        "max_seq_length": spec["seq_len"], "seed": spec["seed"], "num_layers": -1, "learning_rate": spec["lr"],
        "lr_schedule": {"name": "cosine_decay", "arguments": [spec["lr"], steps], "warmup": 0},
        "optimizer": "adamw", "optimizer_config": {"adamw": {"weight_decay": 0.0, "bias_correction": True}},
        "lora_parameters": {"rank": spec["lora_rank"], "scale": spec["lora_alpha"] / spec["lora_rank"],
                            "dropout": 0.0},
        "grad_checkpoint": spec["grad_checkpoint"], "steps_per_report": 1, "steps_per_eval": 10 * steps,
        "val_batches": 1, "save_every": 10 * steps,
    })

    class Record(TrainingCallback):
        def on_train_loss_report(self, info):
            with open(spec["report"], "a") as file:
                file.write(json.dumps({key: float(value) for key, value in info.items()}) + "\n")

    np.random.seed(args.seed)
    mx.random.seed(args.seed)
    model, tokenizer = load(args.model)
    train_set, valid_set, _ = load_dataset(args, tokenizer)
    train_model(args, model, train_set, valid_set, Record())
    return 0


def same_rows_child(spec_path: str) -> int:
    """`--same-rows`: one contender's own training step, run `steps` times on the same random token rows as the
    other's (the spec's seed), MLX's peak read after each step. memfit: its trainer's load, adapters, optimizer and
    compiled step (MlxTrainer.optimizer_step, as memfit.mlx.measure drives it). mlx-lm: mlx_lm.tuner.trainer.train
    itself, its batches given by a stand-in for iterate_batches (the rows, each fully scored), no validation."""
    import mlx.core as mx
    import numpy as np

    spec = json.loads(Path(spec_path).read_text())
    s, steps, rows, width = spec["settings"], spec["steps"], spec["batch_size"], spec["seq_len"]
    if spec["no_cache"]:
        # Without MLX's buffer cache every array gets a buffer of its own size: a cached buffer may serve a request
        # up to two pages smaller (mlx/backend/common/buffer_cache.h), and counts at its own size while it does.
        mx.set_cache_limit(0)
    vocab = json.loads((Path(spec["model"]) / "config.json").read_text())["vocab_size"]
    tokens = np.random.default_rng(s["seed"]).integers(0, vocab, (steps, rows, width), dtype=np.int32)
    peaks: list[int] = []
    if spec["contender"] == "memfit":
        from memfit.config import TrainConfig
        from memfit.mlx.batches import MicroBatch
        from memfit.mlx.trainer import MlxTrainer

        config = TrainConfig(method="lora", lora_rank=s["lora_rank"], lora_alpha=s["lora_alpha"], lr=s["lr"],
                             batch_size=rows, seq_len=width, seed=s["seed"], max_grad_norm=s["max_grad_norm"],
                             grad_checkpointing=spec["grad_checkpoint"])
        trainer = MlxTrainer(None, config, compile_step=True)
        trainer.total_steps = steps
        trainer._build(Path(spec["model"]))
        for batch in tokens:
            micro = MicroBatch(mx.array(batch[:, :-1]), mx.array(batch[:, 1:]),
                               mx.ones((rows, width - 1), dtype=mx.float32), rows * (width - 1))
            trainer.optimizer_step([micro], 1)
            peaks.append(int(mx.get_peak_memory()))
    else:
        import mlx.optimizers as optim
        from mlx_lm import load
        from mlx_lm.tuner.callbacks import TrainingCallback
        from mlx_lm.tuner.trainer import TrainingArgs, train
        from mlx_lm.tuner.utils import build_schedule, linear_to_lora_layers

        mx.random.seed(s["seed"])
        model, _tokenizer = load(spec["model"])
        model.freeze()
        linear_to_lora_layers(model, len(model.layers), {"rank": s["lora_rank"],
                                                         "scale": s["lora_alpha"] / s["lora_rank"], "dropout": 0.0})
        schedule = build_schedule({"name": "cosine_decay", "arguments": [s["lr"], steps], "warmup": 0})
        optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.0, bias_correction=True)

        def batches(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):
            for batch in tokens:
                yield mx.array(batch), mx.array([[0, width]] * rows)

        class Record(TrainingCallback):
            def on_train_loss_report(self, info):
                peaks.append(int(mx.get_peak_memory()))

        args = TrainingArgs(batch_size=rows, iters=steps, steps_per_report=1, steps_per_eval=10 * steps,
                            steps_per_save=10 * steps, max_seq_length=width, grad_checkpoint=spec["grad_checkpoint"],
                            adapter_file=spec["adapter_file"])
        train(model, optimizer, list(range(rows)), None, args, iterate_batches=batches, training_callback=Record())
    Path(spec["out"]).write_text(json.dumps({"step_peak_bytes": peaks}))
    return 0


def same_rows(work: Path, model: Path, steps: int, grad_checkpointing: bool, repeats: int,
              no_cache: bool = False) -> dict:
    """Each contender's step on the same rows, in a fresh child per run, alternating; per-step peaks."""
    found: dict[str, list[list[int]]] = {"memfit": [], "mlx_lm": []}
    for repeat in range(repeats):
        for name in (["memfit", "mlx_lm"] if repeat % 2 == 0 else ["mlx_lm", "memfit"]):
            spec = {"contender": name, "model": str(model), "steps": steps, "batch_size": SETTINGS["batch_size"],
                    "seq_len": SETTINGS["seq_len"], "settings": SETTINGS, "grad_checkpoint": grad_checkpointing,
                    "no_cache": no_cache,
                    "adapter_file": str(work / f"same-{name}-{repeat}.safetensors"),
                    "out": str(work / f"same-{name}-{repeat}.json")}
            spec_path = work / f"same-{name}-{repeat}.spec.json"
            spec_path.write_text(json.dumps(spec))
            code = _run([sys.executable, str(Path(__file__).resolve()), "--same-rows-child", str(spec_path)],
                        work / f"same-{name}-{repeat}.log")[0]
            if code != 0:
                raise SystemExit(f"{name} exited {code}: see {work / f'same-{name}-{repeat}.log'}")
            found[name].append(json.loads(Path(spec["out"]).read_text())["step_peak_bytes"])
    return found


def same_rows_markdown(found: dict, summary: dict, command: str) -> str:
    import platform

    import mlx.core as mx
    from importlib import metadata

    s = summary["settings"]
    cache = ", MLX's buffer cache off" if summary.get("no_cache") else ""
    lines = [f"### The same rows through each contender's step: {summary['preset']}, "
             f"{summary['layers'] or 'all'} layers{cache}", "",
             f"Measured with `{command}` on {time.strftime('%Y-%m-%d')}, {platform.machine()} {platform.system()}, "
             f"Python {platform.python_version()}, mlx {mx.__version__}, mlx-lm {metadata.version('mlx-lm')}. Both "
             f"contenders' own training step on the same random token rows ({s['batch_size']} × {s['seq_len']}, "
             f"every token scored), LoRA r{s['lora_rank']} on every linear, AdamW, no clipping, gradient "
             f"checkpointing {'on' if summary['grad_checkpointing'] else 'off'}, {summary['steps']} steps, a fresh "
             "process per run, alternating: memfit's trainer (its load, adapters, optimizer and compiled step, "
             "`MlxTrainer.optimizer_step`) and `mlx_lm.tuner.trainer.train` itself (rows handed to it in place of "
             "its batch iterator, no validation). MLX's peak (`mx.get_peak_memory()`, loading included) after each "
             "step, in 10^6 bytes."
             + (" Both with `mx.set_cache_limit(0)`: no buffer is reused from MLX's cache, so each array counts at "
                "its own size (a cached buffer serves requests up to two pages smaller than itself and counts at its "
                "own size, mlx/backend/common/buffer_cache.h)." if summary.get("no_cache") else ""), "",
             "| contender | peak after each step, MB (per run) | peak over the run, bytes | ÷ mlx-lm per round |",
             "|---|---|---|---|"]
    anchor = [max(run) for run in found["mlx_lm"]]
    for name, label in (("memfit", "memfit's `MlxTrainer.optimizer_step`"), ("mlx_lm", "`mlx_lm.tuner.trainer.train`")):
        runs = found[name]
        steps_shown = "; ".join(", ".join(f"{x / MB:,.2f}" for x in run) for run in runs)
        ratios = ", ".join(f"{max(run) / a:.6f}" for run, a in zip(runs, anchor)) if name == "memfit" else "1"
        lines.append(f"| {label} | {steps_shown} | {', '.join(f'{max(run):,}' for run in runs)} | {ratios} |")
    return "\n".join(lines) + "\n"


CONTENDERS = {"memfit": "`memfit train --engine mlx`",
              "memfit_no_thread": "the same, guard thread off (`--memory-sample-interval 0`)",
              "memfit_glibc": "the same, glibc's malloc as it comes (`MEMFIT_MALLOC=none`)",
              "mlx_lm": "`mlx_lm.lora` (its `train_model`)"}


def _rate(run: dict) -> float:
    """Median tokens/s over the steps after the first two (compilation and warm-up)."""
    return statistics.median(run["tokens_per_s"][2:] or run["tokens_per_s"])


def summarise(runs: dict[str, list[dict]]) -> dict:
    table = {}
    for name, results in runs.items():
        good = [r for r in results if "error" not in r]
        if not good:
            table[name] = {"error": results[0]["error"] if results else "no run"}
            continue
        rates = [_rate(r) for r in good]
        loads = [r["other_load"] for r in good if r.get("other_load") is not None]
        table[name] = {"tokens_per_s": statistics.median(rates), "tokens_per_s_runs": rates,
                       "peak_mlx_gb": max(r["peak_mlx_bytes"] or 0 for r in good) / GB,
                       "peak_mlx_mb_runs": [(r["peak_mlx_bytes"] or 0) / MB for r in good],
                       "peak_rss_gb": max(r["peak_rss_bytes"] for r in good) / GB,
                       "first_loss": good[0]["losses"][0], "last_loss": good[0]["losses"][-1],
                       "last5_loss": statistics.mean(good[0]["losses"][-5:]),
                       "max_other_load": max(loads) if loads else None}
    ok = [name for name in runs if "error" not in table[name]]
    if "mlx_lm" in ok:
        anchor = runs["mlx_lm"]
        table["ratios"] = {name: {
            "tokens_per_s_rounds": [_rate(a) / _rate(b) for a, b in zip(runs[name], anchor)],
            "peak_mlx_rounds": [(a["peak_mlx_bytes"] or 0) / max(b["peak_mlx_bytes"] or 0, 1)
                                for a, b in zip(runs[name], anchor)],
            "peak_mlx": table[name]["peak_mlx_gb"] / max(table["mlx_lm"]["peak_mlx_gb"], 1e-9),
            "peak_rss": table[name]["peak_rss_gb"] / table["mlx_lm"]["peak_rss_gb"]} for name in ok if name != "mlx_lm"}
    shares = [r["guard_cpu_share"] for r in runs.get("memfit", []) if r.get("guard_cpu_share")]
    if shares:  # the thread's own CPU time over the process's: its cost, below what whole runs can resolve
        table["guard_thread_cpu_share"] = statistics.median(shares)
    if "memfit" in ok and "memfit_no_thread" in ok:
        table["guard_thread_overhead_rounds"] = [
            1 - _rate(a) / _rate(b) for a, b in zip(runs["memfit"], runs["memfit_no_thread"])]
    return table


def markdown(summary: dict, command: str) -> str:
    import platform

    import mlx.core as mx
    from importlib import metadata

    results = summary["results"]
    s = summary["settings"]
    depth = f"{summary['layers']} layers" if summary["layers"] else "all layers"
    lines = [f"## memfit's MLX engine vs mlx-lm (CPU build of MLX): {summary['preset']}, {depth}", "",
             f"Measured with `{command}` on {time.strftime('%Y-%m-%d')}, {platform.machine()} {platform.system()}, "
             f"Python {platform.python_version()}, mlx {mx.__version__}, mlx-lm {metadata.version('mlx-lm')}. "
             f"Model: {summary['preset']} shapes, {summary['layers'] or 'all'} layers, random init. Both train LoRA r"
             f"{s['lora_rank']} (scale {s['lora_alpha'] / s['lora_rank']:g}) on every linear of every layer, AdamW, "
             f"lr {s['lr']} cosine, batch {s['batch_size']} × {s['seq_len']} full unpacked rows (memfit's demo texts "
             "joined into documents longer than a row, so both contenders train on the same shapes), "
             f"gradient checkpointing {'on' if summary['grad_checkpointing'] else 'off'}, {summary['steps']} steps, "
             f"a fresh process per run, the contenders in rotated order for {summary['repeats']} rounds. tokens/s is "
             "the median over steps 3..N of each run; peak MLX is `mx.get_peak_memory()` over the whole run, loading "
             "included (memfit's run.json, mlx-lm's own report), in 10^6 bytes; peak RSS is `wait4`'s. The data "
             "orders differ (mlx-lm sorts by length and shuffles batches), so the losses agree in level and trend, "
             "not step by step.", "",
             "| contender | tokens/s: median (runs) | ÷ mlx-lm per round | peak MLX MB: max (runs) | "
             "÷ mlx-lm per round | peak RSS GB | loss step 1 → mean of last 5 | other load, cores |",
             "|---|---|---|---|---|---:|---|---:|"]
    for name, label in CONTENDERS.items():
        row = results.get(name)
        if row is None:
            continue
        if "error" in row:
            lines.append(f"| {label} | {row['error']} | | | | | | |")
            continue
        ratios = results.get("ratios", {}).get(name)
        per_round = ", ".join(f"{x:.3f}" for x in ratios["tokens_per_s_rounds"]) if ratios else "1"
        peak_rounds = ", ".join(f"{x:.4f}" for x in ratios["peak_mlx_rounds"]) if ratios else "1"
        peaks = row["peak_mlx_mb_runs"]
        load = f"{row['max_other_load']:.2f}" if row["max_other_load"] is not None else "?"
        digits = 1 if row["tokens_per_s"] >= 10 else 2  # a few tokens/s (real shapes on MLX's CPU build): 2 digits
        lines.append(f"| {label} | {row['tokens_per_s']:.{digits}f} "
                     f"({', '.join(f'{x:.{digits}f}' for x in row['tokens_per_s_runs'])})"
                     f" | {per_round} | {max(peaks):,.1f} ({', '.join(f'{x:,.1f}' for x in peaks)}) | {peak_rounds}"
                     f" | {row['peak_rss_gb']:.3f} | "
                     f"{row['first_loss']:.3f} → {row['last5_loss']:.3f} | {load} |")
    overhead = results.get("guard_thread_overhead_rounds")
    share = results.get("guard_thread_cpu_share")
    if share is not None:
        lines += ["", f"The guard's sampler thread used {share:.3%} of memfit's process CPU time (the thread's own "
                  "`time.thread_time`, run.json's `guard_thread_cpu_s`, over the child's CPU time from `wait4`; "
                  "median over the runs): the guard's cost."
                  + (" Whole runs with and without the thread differ by " + ", ".join(f"{x:+.1%}" for x in overhead)
                     + " of tokens/s per round (whole runs: their noise included)."
                     if overhead else "")]
    elif overhead:
        lines += ["", "The guard's sampler thread costs " + ", ".join(f"{x:+.1%}" for x in overhead)
                  + " of tokens/s per round (memfit with the thread against memfit without it)."]
    return "\n".join(lines) + "\n"


def matmul_rates(repeats: int = 3) -> dict[str, float]:
    """GFLOP/s of one fp32 square matmul (1024 and 2048) in MLX and in torch with one thread: why real shapes are
    out of reach of the CPU build of MLX on a machine like this one."""
    import mlx.core as mx
    import torch

    torch.set_num_threads(1)
    rates = {}
    for n in (1024, 2048):
        a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
        mx.eval(a @ b)
        started = time.perf_counter()
        for _ in range(repeats):
            mx.eval(a @ b)
        rates[f"mlx_{n}"] = 2 * n**3 * repeats / (time.perf_counter() - started) / 1e9
        x, y = torch.randn(n, n), torch.randn(n, n)
        x @ y
        started = time.perf_counter()
        for _ in range(repeats):
            x @ y
        rates[f"torch_{n}"] = 2 * n**3 * repeats / (time.perf_counter() - started) / 1e9
    return rates


def write_section(path: Path, marker: str, text: str) -> None:
    sys.path.insert(0, str(HERE))
    from estimate_accuracy import write_section as write

    write(path, marker, text)


def _command_line() -> str:
    """This run's command as the docs show it: the core it was pinned to, without --work's directory."""
    argv = [a for i, a in enumerate(sys.argv[1:]) if a != "--work" and sys.argv[i] != "--work"]
    cores = sorted(os.sched_getaffinity(0))
    pinned = f"taskset -c {','.join(map(str, cores))} " if len(cores) < os.cpu_count() else ""
    return f"{pinned}python benchmarks/mlx_vs_mlx_lm.py " + " ".join(argv)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--same-rows-child", help=argparse.SUPPRESS)
    parser.add_argument("--same-rows", action="store_true",
                        help="only each contender's own step on the same random rows: MLX's peak after every step")
    parser.add_argument("--no-cache", action="store_true",
                        help="with --same-rows: MLX's buffer cache off (mx.set_cache_limit(0)) in both")
    parser.add_argument("--preset", default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: all of the preset's)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-grad-checkpointing", action="store_true")
    parser.add_argument("--batch-size", type=int, default=SETTINGS["batch_size"])
    parser.add_argument("--seq-len", type=int, default=SETTINGS["seq_len"])
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help="which of " + ", ".join(CONTENDERS) + " (mlx_lm is the anchor of the ratios)")
    parser.add_argument("--work", type=Path, default=None, help="keep the model, data and runs here")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    parser.add_argument("--matmul", action="store_true", help="only print MLX's and torch's fp32 matmul GFLOP/s")
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    if args.same_rows_child:
        return same_rows_child(args.same_rows_child)
    if args.matmul:
        print(json.dumps({key: round(value, 1) for key, value in matmul_rates().items()}))
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="memfit-mlx-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    SETTINGS.update(batch_size=args.batch_size, seq_len=args.seq_len)  # both contenders read them
    model, data, data_dir = prepare(work, args.preset, args.layers, args.seq_len)
    checkpointing = not args.no_grad_checkpointing
    if args.same_rows:
        found = same_rows(work, model, args.steps, checkpointing, args.repeats, args.no_cache)
        print(json.dumps(found))
        if args.write:
            summary = {"preset": args.preset, "layers": args.layers, "steps": args.steps, "settings": SETTINGS,
                       "grad_checkpointing": checkpointing, "no_cache": args.no_cache}
            cache = "-no-cache" if args.no_cache else ""
            write_section(ROOT / "docs" / "benchmarks.md",
                          f"mlx-same-rows-{args.preset}-{args.layers or 'all'}{cache}",
                          same_rows_markdown(found, summary, _command_line()))
        return 0
    names = args.contenders.split(",")
    unknown = set(names) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown --contenders {', '.join(sorted(unknown))}: choose from {', '.join(CONTENDERS)}")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            out = work / f"{name}-{repeat}"
            if name == "mlx_lm":
                runs[name].append(run_mlx_lm(model, data_dir, out, args.steps, checkpointing))
            else:
                flags = ("--memory-sample-interval", "0") if name == "memfit_no_thread" else ()
                env = {"MEMFIT_MALLOC": "none"} if name == "memfit_glibc" else None
                runs[name].append(run_memfit(model, data, out, args.steps, checkpointing, flags, env))
            if not args.json:
                shown = {key: value for key, value in runs[name][-1].items() if key != "losses"}
                print(f"repeat {repeat} {name}: {json.dumps(shown)[:300]}", flush=True)
    summary = {"preset": args.preset, "layers": args.layers, "steps": args.steps, "repeats": args.repeats,
               "settings": SETTINGS, "grad_checkpointing": checkpointing, "results": summarise(runs),
               "losses": {name: results[0].get("losses") for name, results in runs.items()}}
    print(json.dumps(summary, indent=None if args.json else 2))
    if args.write:
        command = _command_line()
        # The tiny model's table keeps its section; each other shape has its own beside it, and a batch shape other
        # than the one that section was first measured at (smollm2-135m: 1 x 128) its own.
        marker = "mlx-vs-mlx-lm" if args.preset == "tiny" else f"mlx-vs-mlx-lm-{args.preset}-{args.layers or 'all'}"
        if args.preset != "tiny" and (args.batch_size, args.seq_len) != (1, 128):
            marker += f"-{args.batch_size}x{args.seq_len}"
        write_section(ROOT / "docs" / "benchmarks.md", marker, markdown(summary, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
