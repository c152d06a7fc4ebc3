"""memfit train vs HF Trainer + PEFT LoRA and TRL SFTTrainer: tokens/s, peak RSS and loss, side by side.

Same model, same tokens, same settings and seed for every contender (TRL only where it is installed).

Each contender is a fresh child process, run one after another (never two at once):
- memfit: the real CLI, `python -m memfit train ... --no-packing` plus the variant's flags;
- HF / TRL: benchmarks/_hf_trainer_child.py, which tokenizes with memfit's own `build_dataset(packing=False)` and
  trains on those exact rows (input_ids, labels with -100 on prompt tokens).
Peak memory is the child's peak RSS from `os.wait4` (`ru_maxrss`), the same call for every contender.

    python benchmarks/train_vs_hf.py [--steps 12] [--models smol,qwen] [--only memfit,hf,hf-gbl,trl] [--write]

`--only` takes contender keys (see CONTENDERS); a memfit variant whose flag the installed memfit does not accept yet
is skipped with a note in the table. `--write` replaces the "train-vs-hf" section of docs/benchmarks.md (how it is
measured) and one "train-vs-hf-MODEL" section per model run, each naming the command that measured it: a run of
some models leaves the other models' sections, and the command under them, as they were.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from estimate_accuracy import write_section  # noqa: E402

MARK = "train-vs-hf"
GB = 1024**3

# key -> (memfit preset, decoder layers kept, label). Random init, real shapes, cut in depth to fit 2 CPU cores.
MODELS = {
    "smol": ("smollm2-135m", 6, "small vocab (49,152)"),
    "qwen": ("qwen2.5-0.5b", 4, "large vocab (151,936): the lm_head and logits dominate"),
}

# The same for every contender.
SETTINGS = dict(lora_rank=16, lora_alpha=32, lr=2e-4, batch_size=4, grad_accum=2, seq_len=512, seed=0,
                max_grad_norm=1.0)


@dataclass
class Contender:
    key: str  # for --only
    label: str  # the table's first column
    kind: str  # memfit | hf | trl
    flags: list[str] = field(default_factory=list)  # memfit: extra CLI flags (the last of a repeated flag wins)
    args: dict = field(default_factory=dict)  # hf/trl: extra TrainingArguments / SFTConfig fields


# One line per row. memfit rows are labelled by their flags, so they stay right whatever the installed defaults are.
CONTENDERS = [
    Contender("memfit", "memfit (defaults)", "memfit"),
    Contender("memfit-no-chunked", "memfit --no-chunked-loss", "memfit", ["--no-chunked-loss"]),
    Contender("memfit-no-gbl", "memfit --no-group-by-length", "memfit", ["--no-group-by-length"]),
    Contender("memfit-packing", "memfit --packing", "memfit", ["--packing"]),
    Contender("memfit-compile", "memfit --compile", "memfit", ["--compile"]),
    Contender("hf", "HF Trainer", "hf"),
    Contender("hf-gbl", "HF Trainer, group_by_length", "hf", args={"train_sampling_strategy": "group_by_length"}),
    Contender("trl", "TRL SFTTrainer", "trl"),
]
REFERENCE = "hf"  # the "× HF" columns divide by this contender

# Fixed word list (the 200 most frequent words of memfit's built-in corpus, which the init-model tokenizer is trained
# on) for the generated prompt/completion data.
WORDS = (
    "the and of to it in is that are for can with they their on its at when one be by them small or time from as "
    "into many each what same water an out program so than before every long but memory has only over still more "
    "leaves large were without keeps which may much most through built these where could people next data work how "
    "model along while often good other simple will have numbers some few little machine was not there must make "
    "again until sea others day slowly then end once keep run code this too use number never world under salt "
    "together because around single pieces back whole today different heat words own everything makes even needs "
    "give no careful history stored weights early first warm days across vegetables clear part made up full way "
    "change if after task need changes great all record stone kept enough like served very speed times wrong disk "
    "well written hand such training quickly several set rain carry live birds flowers returns night earth gives "
    "let minutes now eggs sugar months possible cities read learning who towns grew trains records new message far "
    "air why range sound step beans"
).split()


def make_data(path: Path, samples: int, seed: int = 0) -> None:
    """prompt/completion JSONL with uneven lengths: prompts 10-150 words, completions 5-250 words."""
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        words = [rng.choice(WORDS) for _ in range(rng.randint(low, high))]
        for i in range(rng.randint(4, 12), len(words), rng.randint(6, 14)):
            words[i] += "."
        return " ".join(words).capitalize()

    with open(path, "w") as file:
        for _ in range(samples):
            file.write(json.dumps({"prompt": text(10, 150) + "\n", "completion": text(5, 250)}) + "\n")


def make_text_data(path: Path, documents: int, seed: int = 0) -> str:
    """Plain-text JSONL ({"text": ...}, every token scored) with documents of uneven length, as a web or book corpus
    has: word counts log-normal around 180 (20-1,500). Returns a one-line description."""
    rng = random.Random(seed)
    lengths = [min(1500, max(20, int(rng.lognormvariate(5.2, 0.8)))) for _ in range(documents)]
    with open(path, "w") as file:
        for length in lengths:
            words = [rng.choice(WORDS) for _ in range(length)]
            for i in range(rng.randint(4, 12), len(words), rng.randint(6, 14)):
                words[i] += "."
            file.write(json.dumps({"text": " ".join(words).capitalize()}) + "\n")
    return (f"{documents} generated documents of {min(lengths)}-{max(lengths)} words, median "
            f"{statistics.median(lengths):.0f}")


def smollm2_and_text(work: Path, layers: int) -> tuple[Path, Path, str]:
    """smollm2-135m's shapes with `layers` decoder layers (random init) in work/model and 400 generated plain-text
    documents in work/text.jsonl: the paths, and the data's one-line description."""
    model_dir, data = work / "model", work / "text.jsonl"
    subprocess.run([sys.executable, "-m", "memfit", "init-model", "--preset", "smollm2-135m", "--out", str(model_dir),
                    "--layers", str(layers)], check=True, capture_output=True, cwd=HERE.parent)
    return model_dir, data, make_text_data(data, documents=400)


def run_child(command: list[str], log: Path) -> dict:
    """Run `command` to its end: exit code, wall time, peak RSS (os.wait4's ru_maxrss, KiB on Linux), CPU time, and
    how many cores' worth of CPU the rest of the machine used meanwhile (a busy machine slows every figure)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    busy_before = _busy_cpu_s()
    started = time.perf_counter()
    with open(log, "w") as output:
        child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=HERE.parent)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait for it again
    wall = time.perf_counter() - started
    cpu = usage.ru_utime + usage.ru_stime
    other = (_busy_cpu_s() - busy_before - cpu) / wall if busy_before is not None else None
    return {"rc": child.returncode, "wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "cpu_s": cpu,
            "sys_cpu_s": usage.ru_stime, "minor_faults": usage.ru_minflt, "other_load_cores": other, "log": str(log)}


def _busy_cpu_s() -> float | None:
    """Seconds of CPU time the whole machine has spent busy since boot (/proc/stat), or None off Linux."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user..steal; guest time is inside user already


def unknown_flag(run: dict) -> str | None:
    """The flag memfit refused (exit 2, click's "No such option"), or None."""
    if run["rc"] != 2:
        return None
    for line in Path(run["log"]).read_text().splitlines():
        if "No such option" in line or "no such option" in line:
            return line.split("option", 1)[1].strip(" :").split()[0]
    return None


def run_memfit(model_dir: Path, data: Path, work: Path, steps: int, flags: list[str]) -> dict:
    s = SETTINGS
    command = [sys.executable, "-m", "memfit", "train", "--model", str(model_dir), "--data", str(data),
               "--output-dir", str(work / "run"), "--method", "lora", "--lora-rank", str(s["lora_rank"]),
               "--lora-alpha", str(s["lora_alpha"]), "--lora-dropout", "0", "--lora-targets", "all-linear",
               "--batch-size", str(s["batch_size"]), "--grad-accum", str(s["grad_accum"]),
               "--seq-len", str(s["seq_len"]), "--lr", str(s["lr"]), "--warmup-steps", "0",
               "--max-grad-norm", str(s["max_grad_norm"]), "--max-steps", str(steps), "--seed", str(s["seed"]),
               "--dtype", "fp32", "--device", "cpu", "--save-every", "100000", "--memory-report-interval", "100000",
               "--no-packing"]
    # `--log-every 1`: the loss of every step, as HF's logging_steps=1 gives (newer memfit reads it back less often
    # by default). Dropped when this memfit does not know the flag.
    for extra in (["--log-every", "1"], []):
        shutil.rmtree(work / "run", ignore_errors=True)
        run = run_child(command + extra + flags, work / "log.txt")
        refused = unknown_flag(run)
        if not (extra and refused == extra[0]):
            break
    if refused:
        return {**run, "skipped": f"this memfit has no {refused}"}
    metrics_file = work / "run" / "metrics.jsonl"
    if run["rc"] != 0 or not metrics_file.exists() or not metrics_file.read_text().strip():
        return {**run, "failed": f"exit {run['rc']} (see {run['log']})"}
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    return {**run, "steps": [{key: m.get(key) for key in ("step", "loss", "tokens", "step_time_s", "time")}
                             for m in metrics]}


def run_hf(kind: str, model_dir: Path, data: Path, work: Path, steps: int, args: dict) -> dict:
    spec = {**SETTINGS, "trainer": kind, "model": str(model_dir), "data": str(data), "steps": steps,
            "result": str(work / "result.json"), "args": args}
    (work / "spec.json").write_text(json.dumps(spec))
    run = run_child([sys.executable, str(HERE / "_hf_trainer_child.py"), str(work / "spec.json")], work / "log.txt")
    result = json.loads((work / "result.json").read_text()) if (work / "result.json").exists() else {}
    if run["rc"] != 0 or not result.get("steps"):
        return {**run, "failed": f"exit {run['rc']} (see {run['log']})"}
    return {**run, **result}


def summarize(result: dict) -> dict:
    """tokens/s over steps 2..N (step 1 is warm-up), first loss, mean loss of the last 5 steps."""
    steps = result["steps"]
    settled = steps[1:] if len(steps) > 1 else steps
    losses = [s["loss"] for s in steps if s["loss"] is not None]
    return {
        "tokens_per_s": sum(s["tokens"] for s in settled) / sum(s["step_time_s"] for s in settled),
        # Cross-check: the same tokens over step end to step end (all the loop does between steps too).
        "tokens_per_s_wall": (sum(s["tokens"] for s in settled) / (steps[-1]["time"] - steps[0]["time"])
                              if len(steps) > 1 and steps[0].get("time") and steps[-1].get("time") else None),
        "first_loss": steps[0]["loss"],
        "final_loss": statistics.mean(losses[-5:]) if losses else None,
        "tokens": sum(s["tokens"] for s in steps),
        "steps_done": len(steps),
    }


def max_loss_gap(a: dict, b: dict) -> float | None:
    mine = {s["step"]: s["loss"] for s in a["steps"] if s["loss"] is not None}
    theirs = {s["step"]: s["loss"] for s in b["steps"] if s["loss"] is not None}
    common = sorted(set(mine) & set(theirs))
    return max(abs(mine[k] - theirs[k]) for k in common) if common else None


def _own_peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or 'unknown CPU'} ({os.cpu_count()} cores)"


def versions() -> str:
    found = [f"Python {platform.python_version()}"]
    for package in ("memfit", "torch", "transformers", "peft", "accelerate", "trl"):
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            found.append(f"{package} not installed")
    return ", ".join(found)


def trl_available() -> bool:
    try:
        metadata.version("trl")
        return True
    except metadata.PackageNotFoundError:
        return False


def shared_markdown() -> str:
    """How every figure is measured: the same for every run, so no run's numbers are in it."""
    s = SETTINGS
    lines = [
        "## memfit train vs HF Trainer (+ PEFT) and TRL SFTTrainer, on CPU",
        "",
        "Written by `python benchmarks/train_vs_hf.py ... --write`; each model's table below is one run of it, "
        "under the command that made it.",
        "",
        f"Same for every contender: random-init models from `memfit init-model` (real shapes, fewer layers), "
        f"LoRA r={s['lora_rank']} alpha={s['lora_alpha']} dropout 0 on all linear layers of the decoder, AdamW "
        f"(fused, weight decay 0) lr {s['lr']:g}, cosine schedule, no warmup, max grad norm {s['max_grad_norm']:g}, "
        f"micro-batch {s['batch_size']} × grad-accum {s['grad_accum']} = {s['batch_size'] * s['grad_accum']} rows "
        f"per step, seq_len {s['seq_len']} (longer samples truncated, no packing unless the row says so), fp32, "
        f"seed {s['seed']}, `--steps` optimizer steps = one epoch of {s['batch_size'] * s['grad_accum']} × steps "
        "generated prompt/completion samples (prompts 10-150 words, completions 5-250, loss on completion tokens "
        "only), no gradient checkpointing. Tokenized by memfit's `build_dataset` for every contender (the HF/TRL "
        "child imports it), so all train on the same rows.",
        "",
        "How each figure is measured:",
        "- every contender is a fresh child process, one at a time; **peak RSS** = the child's `ru_maxrss` from "
        "`os.wait4` (whole process: Python, imports, tokenizer, data, model, training). On Linux that figure also "
        "counts the RSS of what the child's exec replaced, here this benchmark's own process (vfork): each table "
        "gives that process's peak after its last row, and where it is below every row, each row is the child's own;",
        "- **tokens/s** = real (non-pad) tokens / step time, over steps 2..N (step 1 is warm-up). Step time = "
        "collating the step's micro-batches + forward/backward + clipping + optimizer and scheduler step: memfit's "
        "`step_time_s` from metrics.jsonl; HF/TRL: a TrainerCallback's `on_step_begin`..`on_step_end` plus the "
        "collation time of the step's batches, timed in a wrapping collator that also counts the batch's "
        "attention-mask ones (the Trainer collates before `on_step_begin`);",
        "- **first loss** = step 1's loss (about ln(vocab) at random init); **final loss** = mean of the last 5 "
        "steps' losses (HF/TRL: `trainer.state.log_history` with `logging_steps=1`; memfit: metrics.jsonl with "
        "`--log-every 1` where the flag exists). Every contender's step loss is the token-mean cross-entropy over the "
        "whole step: memfit weights each scored token 1/N for the step's N scored tokens; transformers 5 divides each "
        "micro-batch's summed loss by the step's `num_items_in_batch` (counted over `labels[..., 1:]`), so gradient "
        "accumulation changes neither. **max abs Δ loss** compares each step's loss with the HF Trainer row's. With "
        "seed 0 memfit's row order (`torch.randperm` on a generator seeded `seed × 1000003 + epoch`) is the order "
        "HF's seedable RandomSampler draws (seeded `seed + epoch`), and LoRA's A matrices come from the same seeded "
        "RNG, so the same-order rows train on identical batches: their loss curves differ only by float rounding. "
        "Length grouping (HF's `group_by_length`, memfit's `--group-by-length`) and packing reorder or regroup the "
        "rows, so their per-step losses differ by batch;",
        "- **HF Trainer**: `AutoModelForCausalLM.from_pretrained(dtype=torch.float32)` + `get_peft_model(LoraConfig("
        "target_modules=\"all-linear\"))` after `set_seed`, `DataCollatorForSeq2Seq` (right padding, labels padded "
        "with -100), TrainingArguments defaults otherwise (`use_cpu=True`, `adamw_torch_fused`, `use_cache=False`, "
        "random sampler, `dataloader_num_workers=0`, `report_to=[]`, no saving). The group_by_length row sets "
        "`train_sampling_strategy=\"group_by_length\"`, transformers 5's spelling of `group_by_length=True` "
        "(LengthGroupedSampler over 8-row groups);",
        "- **TRL SFTTrainer**: the same model, `LoraConfig` passed as `peft_config`, the same rows (with their labels) "
        "as a `datasets.Dataset`, the same TrainingArguments; SFTConfig's own defaults `gradient_checkpointing=True` "
        "and `bf16=True` turned off. TRL computes the loss with its fused LM head (4096-token × 32768-vocab tiles, "
        "never the full logits, recomputed in backward; off CUDA it scores every position, padding included) and "
        "logs entropy and token accuracy every micro-batch;",
        "- **memfit**: `python -m memfit train --method lora --lora-rank 16 --lora-alpha 32 --batch-size 4 "
        "--grad-accum 2 --seq-len 512 --lr 2e-4 --dtype fp32 --device cpu --no-packing ...` plus the row's flags; "
        "a row whose flag this memfit does not accept says so;",
        "- **other load** = cores' worth of CPU the rest of the machine used during the run (/proc/stat busy time "
        "minus the child's own): above ~0.2 the timings of that row are slowed by something else.",
        "",
        "Targets for `memfit (defaults)`: tokens/s ≥ 1.15× HF; with HF's row order (`--no-group-by-length`) the "
        "per-step losses within 1e-3 of HF's; on the large-vocab model a peak ≤ 0.8× HF's.",
    ]
    return "\n".join(lines) + "\n"


def model_markdown(key: str, rows: list[dict], steps: int, samples: int, data: dict, command: str,
                   own_peak_bytes: int) -> str:
    """One model's table, under the command and machine that measured it, with its target checks."""
    preset, layers, what = MODELS[key]
    reference = next((r for r in rows if r["key"] == REFERENCE and "summary" in r), None)
    peaks = [r["peak_rss_bytes"] for r in rows if "summary" in r]
    below = ("below every row" if peaks and own_peak_bytes < min(peaks)
             else "NOT below every row: rows under it may read it")
    lines = [f"### {preset}, {layers} layers: {what}", "",
             f"Measured with `{command}` on {platform.machine()} {platform.system()}, {cpu_name()}, "
             f"{time.strftime('%Y-%m-%d')}; {versions()}. {steps} optimizer steps = one epoch of {samples} samples. "
             f"This benchmark's own process peaked at {own_peak_bytes / GB:.2f} GB after the last row ({below}).",
             "",
             f"Data: {data['rows']} rows, {data['tokens']:,} tokens ({data['scored_tokens']:,} scored), "
             f"{data['truncated_samples']} samples truncated to {data['seq_len']}.", "",
             "| contender | tokens/s | × HF | peak RSS (GB) | × HF | first loss | final loss (mean last 5) | "
             "max abs Δ loss vs HF | steps | process wall (s) | other load |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "summary" not in row:
            lines.append(f"| {row['label']} | {row['note']} | | | | | | | | | |")
            continue
        summary = row["summary"]
        speed = summary["tokens_per_s"] / reference["summary"]["tokens_per_s"] if reference else None
        memory = row["peak_rss_bytes"] / reference["peak_rss_bytes"] if reference else None
        gap = max_loss_gap(row, reference) if reference and row is not reference else None
        lines.append(
            f"| {row['label']} | {summary['tokens_per_s']:,.0f} | {_x(speed)} | {row['peak_rss_bytes'] / GB:.2f} | "
            f"{_x(memory)} | {_f(summary['first_loss'])} | {_f(summary['final_loss'])} | {_gap(gap)} | "
            f"{summary['steps_done']} | {row['wall_s']:.0f} | {_f(row['other_load_cores'], 1)} |")
    busy = [row["label"] for row in rows if (row.get("other_load_cores") or 0) > 0.2]
    if busy:
        lines += ["", f"⚠ Other processes used CPU during {', '.join(busy)}: those timings are slowed; rerun on an "
                  "idle machine before comparing them."]
    checks = target_checks({key: rows})
    lines += ["", "Targets for `memfit (defaults)`:", ""]
    lines += [f"- {check}" for check in checks] or ["- not checked: they need the `memfit` and `hf` rows"]
    return "\n".join(lines) + "\n"


def target_checks(tables: dict) -> list[str]:
    checks = []
    for key, rows in tables.items():
        by_key = {r["key"]: r for r in rows if "summary" in r}
        mine, theirs = by_key.get("memfit"), by_key.get(REFERENCE)
        if not (mine and theirs):
            continue
        preset = MODELS[key][0]
        speed = mine["summary"]["tokens_per_s"] / theirs["summary"]["tokens_per_s"]
        checks.append(f"tokens/s ≥ 1.15× HF on {preset}: {speed:.2f}× — {'met' if speed >= 1.15 else 'NOT met'}")
        same_order = by_key.get("memfit-no-gbl")  # HF's row order: the per-step losses must agree
        if same_order:
            gap = max_loss_gap(same_order, theirs)
            checks.append(f"loss curve equivalent on {preset}: `--no-group-by-length` (HF's row order, chunked loss) "
                          f"vs HF, max abs Δ over {same_order['summary']['steps_done']} steps = {_gap(gap)} — "
                          f"{'met' if gap is not None and gap <= 1e-3 else 'NOT met'}")
        if key == "qwen":
            memory = mine["peak_rss_bytes"] / theirs["peak_rss_bytes"]
            checks.append(f"peak ≤ 0.8× HF on the large-vocab model ({preset}): {memory:.2f}× — "
                          f"{'met' if memory <= 0.8 else 'NOT met'}")
    return checks


def _x(value) -> str:
    return "" if value is None else f"{value:.2f}×"


def _gap(value) -> str:
    if value is None:
        return "–"
    return "0" if value == 0 else f"{value:.1e}" if value < 1e-3 else f"{value:.3f}"


def _f(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps (= one epoch of the generated data)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--only", default=None, help=f"comma-separated contender keys: "
                        f"{', '.join(c.key for c in CONTENDERS)} (default: all)")
    parser.add_argument("--write", action="store_true", help="write the tables into docs/benchmarks.md")
    parser.add_argument("--out", default=str(HERE.parent / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2: step 1 is warm-up and left out of tokens/s")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for model in models:
        if model not in MODELS:
            parser.error(f"unknown model {model!r}: choose from {', '.join(MODELS)}")
    contenders = CONTENDERS
    if args.only:
        wanted = [k.strip() for k in args.only.split(",") if k.strip()]
        unknown = sorted(set(wanted) - {c.key for c in CONTENDERS})
        if unknown:
            parser.error(f"unknown contender {unknown[0]!r}: choose from {', '.join(c.key for c in CONTENDERS)}")
        contenders = [c for c in CONTENDERS if c.key in wanted]

    from memfit.models import init_model

    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="memfit-train-vs-hf-"))
    samples = args.steps * SETTINGS["batch_size"] * SETTINGS["grad_accum"]
    data = scratch / "data.jsonl"
    make_data(data, samples)
    tables, raw, stats, own_peaks = {}, {"settings": SETTINGS, "steps": args.steps, "samples": samples}, {}, {}
    for model_key in models:
        preset, layers, _ = MODELS[model_key]
        model_dir = scratch / "models" / model_key
        init_model(preset, model_dir, dtype="fp32", num_layers=layers)
        stats[model_key] = dataset_stats(model_dir, data)
        print(f"{preset}: {samples} samples -> {stats[model_key]['rows']} rows, {stats[model_key]['tokens']:,} "
              f"tokens ({stats[model_key]['scored_tokens']:,} scored), {stats[model_key]['truncated_samples']} "
              "truncated", flush=True)
        rows = []
        for contender in contenders:
            work = scratch / "runs" / model_key / contender.key
            work.mkdir(parents=True, exist_ok=True)
            row = {"key": contender.key, "label": contender.label}
            if contender.kind == "trl" and not trl_available():
                row["note"] = "skipped: trl not installed"
            else:
                if contender.kind == "memfit":
                    result = run_memfit(model_dir, data, work, args.steps, contender.flags)
                else:
                    result = run_hf(contender.kind, model_dir, data, work, args.steps, contender.args)
                row.update(result)
                if "skipped" in result:
                    row["note"] = f"skipped: {result['skipped']}"
                elif "failed" in result:
                    row["note"] = f"failed: {result['failed']}"
                else:
                    row["summary"] = summarize(result)
            rows.append(row)
            print(describe(preset, row), flush=True)
            for bulky in ("run/checkpoints", "run/final", "hf-out"):  # keep logs, metrics and results only
                shutil.rmtree(work / bulky, ignore_errors=True)
        shutil.rmtree(model_dir)
        tables[model_key] = rows
        own_peaks[model_key] = _own_peak_rss_bytes()
        raw[model_key] = {"data_stats": stats[model_key], "contenders": rows}
    command = "python benchmarks/train_vs_hf.py " + " ".join(
        [f"--steps {args.steps}"] + ([f"--models {args.models}"] if args.models != ",".join(MODELS) else [])
        + ([f"--only {args.only}"] if args.only else []) + ["--write"])
    sections = {MARK: shared_markdown()}
    for key, rows in tables.items():
        sections[f"{MARK}-{key}"] = model_markdown(key, rows, args.steps, samples, stats[key], command,
                                                   own_peaks[key])
    table = "\n".join(sections.values())
    raw_path = scratch / "results.json"
    raw_path.write_text(json.dumps(raw, indent=1, default=str))
    print()
    print(table)
    print(f"raw results and per-step loss curves: {raw_path}")
    print(f"wall time of the whole benchmark: {time.perf_counter() - started:.0f} s")
    if args.write:
        for marker, body in sections.items():
            write_section(Path(args.out), marker, body)
        print(f"wrote {', '.join(sections)} in {args.out}")


def dataset_stats(model_dir: Path, data: Path) -> dict:
    from transformers import AutoTokenizer

    from memfit.data import build_dataset

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    return vars(build_dataset(data, tokenizer, SETTINGS["seq_len"], packing=False).stats)


def describe(preset: str, row: dict) -> str:
    if "summary" not in row:
        return f"{preset:14s} {row['label']:32s} {row['note']}"
    s = row["summary"]
    wall = f"{s['tokens_per_s_wall']:,.0f}" if s["tokens_per_s_wall"] else "-"
    return (f"{preset:14s} {row['label']:32s} {s['tokens_per_s']:7,.0f} tok/s (step end to end {wall})  "
            f"peak {row['peak_rss_bytes'] / GB:5.2f} GB  loss {_f(s['first_loss'])} -> {_f(s['final_loss'])}  "
            f"{s['steps_done']} steps  {row['wall_s']:.0f} s  other load {_f(row['other_load_cores'], 1)}")


if __name__ == "__main__":
    main()
