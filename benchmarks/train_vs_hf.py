"""memfit train vs HF Trainer + PEFT (three data layouts) and TRL SFTTrainer, on full-depth models: tokens/s, each
child's own peak RSS, and the loss curve, with repeats and their spread.

    python benchmarks/train_vs_hf.py [--models smol,qwen] [--datasets text,pc] [--repeats 3] [--steps 6]
                                     [--seq-len 256] [--threads 2] [--malloc threshold] [--check-loss] [--write]

Contenders (`--only` takes their keys), each a fresh child process, one at a time, in an order rotated every repeat
(A B C, B C A, C A B, ...) so that each takes each place once per round:
- memfit: the real CLI (`python -m memfit train`) with memfit's defaults for the data (text: rows filled from a
  stream of documents, documents kept apart; prompt/completion: one sample per row, length-grouped);
- hf-gbl: HF Trainer + PEFT, one sample per row, padded, `group_by_length` (its own megabatch rule);
- hf-blocks: HF Trainer + PEFT on transformers' `run_clm.py` layout (all tokens concatenated, cut into blocks);
- hf-flat: HF Trainer + PEFT, padding-free (`DataCollatorWithFlattening`, samples kept apart by positions);
- trl: TRL SFTTrainer at its own best: best-fit-decreasing packing, padding-free.
`--check-loss` adds, in the first repeat only, a pair that trains on the very same rows in the same order: memfit
`--no-packing --no-group-by-length` and HF Trainer padded in its random order; their per-step losses must agree.

Every child gets the same thread count (OMP_NUM_THREADS) and the same allocator policy (memfit's, applied in the HF
children by memfit's own `allocator.configure`, with its step-end call); each reports its own VmHWM (memfit: run.json's
`peak_rss_bytes`; HF/TRL: /proc/self/status at the end), so no parent's high-water mark leaks into a row.
`--write` replaces the "train-vs-hf" section of docs/benchmarks.md and one section per model and dataset run, each
under the command that measured it.
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


@dataclass(frozen=True)
class Model:
    preset: str
    layers: int | None  # None: every layer of the published model
    batch_size: int  # micro-batch rows of seq_len tokens
    what: str


# Random init, real shapes (`memfit init-model`). The full-depth models are what users train; the cuts are what the
# earlier tables measured. qwen2.5-0.5b is ~4x the work per token of smollm2-135m: one row per micro-batch keeps
# every repeat of every contender within about 45 minutes on 2 cores.
MODELS = {
    "smol": Model("smollm2-135m", None, 2, "all 30 layers, vocab 49,152"),
    "qwen": Model("qwen2.5-0.5b", None, 1, "all 24 layers, vocab 151,936: the lm_head and logits weigh most"),
    "smol-cut": Model("smollm2-135m", 6, 2, "6 of 30 layers (a cut)"),
    "qwen-cut": Model("qwen2.5-0.5b", 4, 1, "4 of 24 layers (a cut)"),
}
DATASETS = {
    "text": "plain text, every token scored",
    "pc": "prompt/completion, completion tokens scored",
}

# The same for every contender.
SETTINGS = dict(lora_rank=16, lora_alpha=32, lr=2e-4, grad_accum=1, seed=0, max_grad_norm=1.0)


@dataclass
class Contender:
    key: str  # for --only
    label: str  # the table's first column
    kind: str  # memfit | hf | trl
    flags: list[str] = field(default_factory=list)  # memfit: extra CLI flags
    layout: str = "padded"  # hf: padded | blocks | flat
    args: dict = field(default_factory=dict)  # hf/trl: extra TrainingArguments / SFTConfig fields
    check: bool = False  # the same-rows loss check (first repeat only, with --check-loss)
    datasets: tuple[str, ...] = tuple(DATASETS)  # where the row means something of its own


CONTENDERS = [
    Contender("memfit", "memfit (defaults, no checkpointing)", "memfit"),
    # Prompt/completion is not packed by default (memfit's reader keeps one sample per row); `--packing` puts whole
    # samples into rows best-fit, kept apart: memfit's fastest layout for that data. On text it is the default.
    Contender("memfit-packing", "memfit --packing (no checkpointing)", "memfit", ["--packing"], datasets=("pc",)),
    Contender("hf-gbl", "HF Trainer, padded, group_by_length", "hf", layout="padded",
              args={"train_sampling_strategy": "group_by_length"}),
    Contender("hf-blocks", "HF Trainer, packed blocks (run_clm)", "hf", layout="blocks"),
    Contender("hf-flat", "HF Trainer, padding-free (DataCollatorWithFlattening)", "hf", layout="flat"),
    Contender("trl", "TRL SFTTrainer, packing (bfd, padding-free)", "trl"),
    Contender("memfit-same", "memfit --no-packing --no-group-by-length", "memfit",
              ["--no-packing", "--no-group-by-length"], check=True),
    Contender("hf-same", "HF Trainer, padded, random order", "hf", layout="padded", check=True),
]
PEERS = ("hf-gbl", "hf-blocks", "hf-flat", "trl")  # "best HF" is the fastest of these

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
    """Seconds of CPU time spent busy since boot (/proc/stat) on the CPUs this process may run on (all of them unless
    it was pinned, e.g. `taskset -c 1`), or None off Linux."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    per_cpu = {int(line.split()[0][3:]): line for line in lines if line.startswith("cpu") and line[3].isdigit()}
    chosen = [per_cpu[cpu] for cpu in sorted(allowed)] if allowed and set(allowed) != set(per_cpu) else [lines[0]]
    busy = 0.0
    for line in chosen:
        try:
            fields = [int(v) for v in line.split()[1:]]
        except ValueError:
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        busy += sum(fields[:8]) - idle  # user..steal; guest time is inside user already
    return busy / os.sysconf("SC_CLK_TCK")


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


def run_memfit(model_dir: Path, data: Path, work: Path, steps: int, seq_len: int, batch: int,
               flags: list[str]) -> dict:
    s = SETTINGS
    shutil.rmtree(work / "run", ignore_errors=True)
    command = [sys.executable, "-m", "memfit", "train", "--model", str(model_dir), "--data", str(data),
               "--output-dir", str(work / "run"), "--method", "lora", "--lora-rank", str(s["lora_rank"]),
               "--lora-alpha", str(s["lora_alpha"]), "--lora-dropout", "0", "--lora-targets", "all-linear",
               "--batch-size", str(batch), "--grad-accum", str(s["grad_accum"]), "--seq-len", str(seq_len),
               "--lr", str(s["lr"]), "--warmup-steps", "0", "--max-grad-norm", str(s["max_grad_norm"]),
               "--max-steps", str(steps), "--seed", str(s["seed"]), "--dtype", "fp32", "--device", "cpu",
               "--save-every", "100000", "--memory-report-interval", "100000", "--log-every", "1",
               # HF's and TRL's step here: no recompute (memfit's default turns checkpointing on to fit big models).
               "--no-grad-checkpointing", *flags]
    run = run_child(command, work / "log.txt")
    metrics_file, run_json = work / "run" / "metrics.jsonl", work / "run" / "run.json"
    if run["rc"] != 0 or not metrics_file.exists() or not run_json.exists():
        return {**run, "failed": f"exit {run['rc']} (see {run['log']})"}
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    ended = json.loads(run_json.read_text())
    return {**run, "peak_rss_bytes": ended["peak_rss_bytes"], "guard_thread_cpu_s": ended.get("guard_thread_cpu_s"),
            "steps": [{key: m.get(key) for key in ("step", "loss", "tokens", "step_time_s", "time")}
                      for m in metrics]}


def run_hf(contender: Contender, model_dir: Path, data: Path, work: Path, steps: int, seq_len: int, batch: int,
           malloc: str) -> dict:
    spec = {**SETTINGS, "trainer": contender.kind, "layout": contender.layout, "model": str(model_dir),
            "data": str(data), "steps": steps, "seq_len": seq_len, "batch_size": batch, "malloc": malloc,
            "result": str(work / "result.json"), "args": contender.args}
    (work / "spec.json").write_text(json.dumps(spec))
    (work / "result.json").unlink(missing_ok=True)
    run = run_child([sys.executable, str(HERE / "_hf_trainer_child.py"), str(work / "spec.json")], work / "log.txt")
    result = json.loads((work / "result.json").read_text()) if (work / "result.json").exists() else {}
    if run["rc"] != 0 or not result.get("steps"):
        return {**run, "failed": f"exit {run['rc']} (see {run['log']})"}
    return {**run, **result}  # the child's own VmHWM replaces wait4's figure


def summarize(result: dict) -> dict:
    """tokens/s over steps 2..N (step 1 is warm-up), tokens per step, first loss, mean loss of the last 3 steps."""
    steps = result["steps"]
    settled = steps[1:] if len(steps) > 1 else steps
    losses = [s["loss"] for s in steps if s["loss"] is not None]
    return {
        "tokens_per_s": sum(s["tokens"] for s in settled) / sum(s["step_time_s"] for s in settled),
        "tokens_per_step": statistics.mean(s["tokens"] for s in steps),
        "first_loss": steps[0]["loss"],
        "final_loss": statistics.mean(losses[-3:]) if losses else None,
        "steps_done": len(steps),
    }


def max_loss_gap(a: dict, b: dict) -> float | None:
    mine = {s["step"]: s["loss"] for s in a["steps"] if s["loss"] is not None}
    theirs = {s["step"]: s["loss"] for s in b["steps"] if s["loss"] is not None}
    common = sorted(set(mine) & set(theirs))
    return max(abs(mine[k] - theirs[k]) for k in common) if common else None


def spread(values: list[float], fmt: str) -> str:
    """median (min–max) of repeats; the median alone for one value."""
    if not values:
        return "–"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}–{format(max(values), fmt)})"


@dataclass
class Table:
    """One model × dataset: every repeat of every contender, in run order."""

    model: str
    dataset: str
    runs: dict[str, list[dict]] = field(default_factory=dict)  # contender key -> one result per repeat

    def ok(self, key: str) -> list[dict]:
        return [r for r in self.runs.get(key, []) if "summary" in r]

    def speed(self, key: str) -> list[float]:
        return [r["summary"]["tokens_per_s"] for r in self.ok(key)]

    def peak(self, key: str) -> list[float]:
        return [r["peak_rss_bytes"] for r in self.ok(key)]

    def ratios(self, key: str, other: str, what: str) -> list[float]:
        """`key`'s figure over `other`'s, repeat by repeat (the pairs ran in the same round)."""
        pick = self.speed if what == "speed" else self.peak
        return [a / b for a, b in zip(pick(key), pick(other))]

    def best_peer(self) -> str | None:
        peers = [k for k in PEERS if self.speed(k)]
        return max(peers, key=lambda k: statistics.median(self.speed(k))) if peers else None


def shared_markdown(args) -> str:
    """How every figure is measured: the same for every table, so no figures in it."""
    s = SETTINGS
    lines = [
        "## memfit train vs HF Trainer (+ PEFT) and TRL SFTTrainer, on CPU",
        "",
        "Written by `python benchmarks/train_vs_hf.py ... --write`; each table below is one model and dataset, under "
        "the command that measured it.",
        "",
        f"Same for every contender: random-init models from `memfit init-model` (real shapes; full depth unless the "
        f"table says it is a cut), LoRA r={s['lora_rank']} alpha={s['lora_alpha']} dropout 0 on all linear layers "
        f"of the decoder, AdamW (fused, weight decay 0) lr {s['lr']:g}, cosine schedule, no warmup, max grad norm "
        f"{s['max_grad_norm']:g}, rows of at most `--seq-len` tokens, the table's micro-batch, grad-accum "
        f"{s['grad_accum']}, fp32, seed {s['seed']}, no gradient checkpointing, the same `OMP_NUM_THREADS` and the "
        "same allocator policy (memfit's default unless the command says `--malloc`: HF and TRL children apply it "
        "with memfit's own `allocator.configure` and call its step-end hook from a TrainerCallback). Data, "
        "generated: **text** = plain-text documents with log-normal lengths (every token scored); **pc** = "
        "prompt/completion pairs (prompts 10-150 words, completions 5-250; completion tokens scored). memfit's "
        "reader and tokenizer call tokenize for memfit and the HF rows; TRL tokenizes the same records itself.",
        "",
        "Contenders: **memfit (defaults)** = `python -m memfit train --method lora ... --dtype fp32 --device cpu`, "
        "packing and grouping as memfit chooses for the data (text: rows filled from the document stream, "
        "documents kept apart; pc: one sample per row, length-grouped), its LoRA layers, gated MLPs and RMSNorms "
        "each run as one autograd function (`memfit/train/lora_linear.py`, `gated_mlp.py`, `rms_norm.py`; PEFT's "
        "adapter weights) and packed rows' attention runs on each sample alone (`memfit/models/attention.py`). "
        "**HF Trainer** + PEFT (`get_peft_model`, "
        "`target_modules=\"all-linear\"`), TrainingArguments defaults otherwise (`adamw_torch_fused`, no saving), "
        "in three layouts: padded one-sample rows with `group_by_length` (transformers 5: "
        "`train_sampling_strategy=\"group_by_length\"`, its LengthGroupedSampler's own megabatch rule); "
        "`run_clm.py`'s packed blocks (every token concatenated and cut into `--seq-len` blocks: nothing padded, "
        "attention crosses documents); padding-free `DataCollatorWithFlattening` (one flattened row per "
        "micro-batch, positions reset per sample; transformers 5 keeps samples apart from those positions). "
        "**TRL SFTTrainer** with `packing=True` (best-fit decreasing, padding-free), SFTConfig's "
        "`gradient_checkpointing` and `bf16` defaults off for the same fp32 step.",
        "",
        "How each figure is measured:",
        "- each contender is a fresh child process, one at a time; the order is rotated every repeat, so every "
        "contender runs in every place of a round once; figures are the **median (min–max) over the repeats**;",
        "- **tokens/s** = real (non-pad) tokens / step time over steps 2..N (step 1 is warm-up). Step time = "
        "collating the step's micro-batches + forward/backward + clipping + optimizer and scheduler step: memfit's "
        "`step_time_s` (metrics.jsonl); HF/TRL: `on_step_begin`..`on_step_end` plus the collation of the step's "
        "batches, timed in a wrapping collator (the Trainer collates before `on_step_begin`);",
        "- **memfit ÷ row** = memfit's figure over the row's in the same round, then the median (min–max) of those "
        "per-round ratios: > 1 on tokens/s means memfit is faster, < 1 on peak RSS means memfit needs less;",
        "- **peak RSS** = the child's own high-water mark (VmHWM): memfit's run.json `peak_rss_bytes`, the HF/TRL "
        "child's /proc/self/status at its end; the whole process (Python, imports, tokenizer, data, model, "
        "training). A peak grows with the tokens a step holds (**tokens/step**): the padding-free HF rows hold "
        "one sample per row, about half what a full row holds, so their peak is not comparable with full rows'; "
        "the `--check-loss` pair compares peaks on the very same tokens;",
        "- **first loss** / **final loss** (mean of the last 3 steps) are from the first repeat (seeded runs repeat "
        "them exactly); rows that lay the data out differently see different batches, so their losses are not "
        "comparable step by step. With `--check-loss` the same-rows pair (memfit `--no-packing "
        "--no-group-by-length`, HF padded in its random order: the same rows in the same order, the same LoRA "
        "init) gives **max abs Δ loss** over every step;",
        "- **other load** = the most cores' worth of CPU that anything else used, on the CPUs the benchmark may run on, "
        "during any of the row's runs (/proc/stat busy time of those CPUs minus the child's own): run it pinned "
        "(`taskset -c 1 python benchmarks/train_vs_hf.py ... --threads 1`) to keep other work on the other core.",
        "",
        "Targets (issue 18) for `memfit (defaults)`: tokens/s ≥ 1.15× the fastest HF/TRL row on every dataset and "
        "full-depth model; on the large-vocab model a peak ≤ 0.8× HF's; the loss curve equivalent where the rows "
        "are the same.",
    ]
    return "\n".join(lines) + "\n"


def table_markdown(table: Table, args, command: str, data_note: str, date: str) -> str:
    model = MODELS[table.model]
    depth = "all layers" if model.layers is None else f"{model.layers} layers (cut)"
    lines = [f"### {model.preset}, {depth}, {DATASETS[table.dataset]}", "",
             f"Measured with `{command}` on {platform.machine()} {platform.system()}, {cpu_name()}, "
             f"{date}; {versions()}. {model.what}; micro-batch {model.batch_size} × "
             f"seq_len {args.seq_len}, {args.steps} optimizer steps, {args.repeats} repeats, OMP_NUM_THREADS="
             f"{args.threads}, allocator policy `{args.malloc}`. Data: {data_note}.", "",
             "| contender | tokens/s | memfit ÷ row | tokens/step | peak RSS (GB) | memfit ÷ row | first loss | "
             "final loss | other load |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for contender in CONTENDERS:
        runs = table.runs.get(contender.key)
        if not runs or contender.check:
            continue
        good = table.ok(contender.key)
        if not good:
            lines.append(f"| {contender.label} | {runs[0].get('note', 'failed')} | | | | | | | |")
            continue
        first = good[0]["summary"]
        mine = contender.key == "memfit"
        speed_ratio = "" if mine or not table.ok("memfit") else spread(table.ratios("memfit", contender.key, "speed"), ".2f") + "×"
        peak_ratio = "" if mine or not table.ok("memfit") else spread(table.ratios("memfit", contender.key, "peak"), ".2f") + "×"
        load = max((r.get("other_load_cores") or 0) for r in good)
        lines.append(
            f"| {contender.label} | {spread(table.speed(contender.key), ',.0f')} | {speed_ratio} | "
            f"{first['tokens_per_step']:,.0f} | {spread([p / GB for p in table.peak(contender.key)], '.2f')} | "
            f"{peak_ratio} | {_f(first['first_loss'])} | {_f(first['final_loss'])} | {load:.1f} |")
    same, theirs = table.ok("memfit-same"), table.ok("hf-same")
    if same and theirs:
        gap = max_loss_gap(same[0], theirs[0])
        lines += ["", f"Same rows, same order (`--check-loss`): memfit `--no-packing --no-group-by-length` vs HF "
                  f"Trainer padded, random order, over {same[0]['summary']['steps_done']} steps: max abs Δ loss = "
                  f"{_gap(gap)} (first loss {_f(same[0]['summary']['first_loss'])} vs "
                  f"{_f(theirs[0]['summary']['first_loss'])}; tokens/s {same[0]['summary']['tokens_per_s']:,.0f} vs "
                  f"{theirs[0]['summary']['tokens_per_s']:,.0f}; peak RSS {same[0]['peak_rss_bytes'] / GB:.2f} vs "
                  f"{theirs[0]['peak_rss_bytes'] / GB:.2f} GB = {same[0]['peak_rss_bytes'] / theirs[0]['peak_rss_bytes']:.2f}×"
                  f" on the very same tokens; one run each)."]
    lines += ["", "Targets:", ""] + [f"- {check}" for check in target_checks(table)]
    return "\n".join(lines) + "\n"


def target_checks(table: Table) -> list[str]:
    if not table.ok("memfit"):
        return ["not checked: memfit did not run"]
    checks = []
    best = table.best_peer()
    for mine in ("memfit", "memfit-packing"):
        if best and table.ok(mine):
            ratio = table.ratios(mine, best, "speed")
            checks.append(f"tokens/s of {label(mine)} ≥ 1.15× the fastest peer's ({label(best)}): "
                          f"{spread(ratio, '.2f')}× — {'met' if statistics.median(ratio) >= 1.15 else 'NOT met'}")
    peers = [k for k in PEERS if table.peak(k)]
    if peers and table.model.startswith("qwen"):
        leanest = min(peers, key=lambda k: statistics.median(table.peak(k)))
        ratio = table.ratios("memfit", leanest, "peak")
        checks.append(f"peak of {label('memfit')} ≤ 0.8× the leanest peer's ({label(leanest)}) on the large-vocab "
                      f"model: {spread(ratio, '.2f')}× — {'met' if statistics.median(ratio) <= 0.8 else 'NOT met'}")
    same, theirs = table.ok("memfit-same"), table.ok("hf-same")
    if same and theirs and table.model.startswith("qwen"):
        ratio = same[0]["peak_rss_bytes"] / theirs[0]["peak_rss_bytes"]
        checks.append(f"peak ≤ 0.8× HF's on the very same rows (the `--check-loss` pair): {ratio:.2f}× — "
                      f"{'met' if ratio <= 0.8 else 'NOT met'}")
    if same and theirs:
        gap = max_loss_gap(same[0], theirs[0])
        checks.append(f"loss curve equivalent on the same rows: max abs Δ {_gap(gap)} — "
                      f"{'met' if gap is not None and gap <= 1e-3 else 'NOT met'} (bound 1e-3)")
    return checks


def label(key: str) -> str:
    return next(c.label for c in CONTENDERS if c.key == key)


def _gap(value) -> str:
    if value is None:
        return "–"
    return "0" if value == 0 else f"{value:.1e}" if value < 1e-3 else f"{value:.3f}"


def _f(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def trl_available() -> bool:
    try:
        metadata.version("trl")
        return True
    except metadata.PackageNotFoundError:
        return False


def run_one(contender: Contender, model: Model, model_dir: Path, data: Path, work: Path, args) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    if contender.kind == "trl" and not trl_available():
        return {"note": "skipped: trl not installed (pip install -c constraints.txt -e '.[bench]')"}
    if contender.kind == "memfit":
        result = run_memfit(model_dir, data, work, args.steps, args.seq_len, model.batch_size, contender.flags)
    else:
        result = run_hf(contender, model_dir, data, work, args.steps, args.seq_len, model.batch_size, args.malloc)
    for bulky in ("run/checkpoints", "run/final", "hf-out"):  # keep logs, metrics and results only
        shutil.rmtree(work / bulky, ignore_errors=True)
    if "failed" in result:
        return {**result, "note": f"failed: {result['failed']}"}
    return {**result, "summary": summarize(result)}


def describe(label: str, row: dict) -> str:
    if "summary" not in row:
        return f"  {label:52s} {row['note']}"
    s = row["summary"]
    return (f"  {label:52s} {s['tokens_per_s']:7,.0f} tok/s  {s['tokens_per_step']:6,.0f} tok/step  peak "
            f"{row['peak_rss_bytes'] / GB:5.2f} GB  loss {_f(s['first_loss'])} -> {_f(s['final_loss'])}  "
            f"{row['wall_s']:.0f} s  other load {_f(row['other_load_cores'], 1)}")


def render(results: Path, parser, out: Path, write: bool) -> None:
    """The sections of an earlier run, from its results.json: the same figures under the same command and date."""
    raw = json.loads(results.read_text())
    command = raw["command"]
    args = parser.parse_args(command.split("train_vs_hf.py", 1)[1].split())
    args.malloc = args.malloc or "threshold"
    notes = raw.get("notes") or {"pc": "400 generated prompt/completion pairs"}
    if "text" not in notes:  # runs before notes were stored: the generator is seeded, its description the same
        with tempfile.TemporaryDirectory() as scratch:
            notes["text"] = make_text_data(Path(scratch) / "text.jsonl", documents=400)
    date = raw.get("date") or time.strftime("%Y-%m-%d", time.localtime(results.stat().st_mtime))
    sections = {MARK: shared_markdown(args)}
    for entry in raw["tables"]:
        table = Table(entry["model"], entry["dataset"], entry["runs"])
        sections[f"{MARK}-{table.model}-{table.dataset}"] = table_markdown(table, args, command,
                                                                           notes[table.dataset], date)
    for marker, body in sections.items():
        print(body)
        if write:
            write_section(out, marker, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smol,qwen", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--datasets", default="text,pc", help=f"comma-separated: {', '.join(DATASETS)}")
    parser.add_argument("--only", default=None, help=f"comma-separated contender keys: "
                        f"{', '.join(c.key for c in CONTENDERS if not c.check)} (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (step 1 is warm-up)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for every contender")
    parser.add_argument("--malloc", default=None, help="allocator policy for every contender (default: memfit's)")
    parser.add_argument("--check-loss", action="store_true", help="add the same-rows pair (first repeat only)")
    parser.add_argument("--write", action="store_true", help="write the tables into docs/benchmarks.md")
    parser.add_argument("--out", default=str(HERE.parent / "docs" / "benchmarks.md"))
    parser.add_argument("--render", metavar="RESULTS_JSON", help="no runs: rebuild the sections from a results.json "
                        "an earlier run left (its command, date and figures), e.g. after a change of layout")
    args = parser.parse_args()
    if args.render:
        render(Path(args.render), parser, Path(args.out), args.write)
        return
    if args.steps < 2:
        parser.error("--steps must be at least 2: step 1 is warm-up and left out of tokens/s")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    for name, chosen, known in (("model", models, MODELS), ("dataset", datasets, DATASETS)):
        for value in chosen:
            if value not in known:
                parser.error(f"unknown {name} {value!r}: choose from {', '.join(known)}")
    keys = [c.key for c in CONTENDERS if not c.check]
    wanted = [k.strip() for k in args.only.split(",")] if args.only else keys
    unknown = sorted(set(wanted) - set(keys))
    if unknown:
        parser.error(f"unknown contender {unknown[0]!r}: choose from {', '.join(keys)}")
    chosen = [c for c in CONTENDERS if c.key in wanted]
    checks = [c for c in CONTENDERS if c.check] if args.check_loss else []

    from memfit import allocator
    from memfit.models import init_model

    args.malloc = allocator.chosen_policy(args.malloc)
    os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                      MEMFIT_MALLOC=args.malloc, TOKENIZERS_PARALLELISM="false")
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="memfit-train-vs-hf-"))
    data_files = {"text": scratch / "text.jsonl", "pc": scratch / "pc.jsonl"}
    notes = {"text": make_text_data(data_files["text"], documents=400)}
    make_data(data_files["pc"], 400)
    notes["pc"] = "400 generated prompt/completion pairs"
    pinned = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    prefix = f"taskset -c {','.join(map(str, pinned))} " if pinned and len(pinned) < (os.cpu_count() or 0) else ""
    command = prefix + "python benchmarks/train_vs_hf.py " + " ".join(
        [f"--models {args.models}", f"--datasets {args.datasets}"] + ([f"--only {args.only}"] if args.only else [])
        + [f"--repeats {args.repeats}", f"--steps {args.steps}", f"--seq-len {args.seq_len}",
           f"--threads {args.threads}", f"--malloc {args.malloc}"] + (["--check-loss"] if args.check_loss else [])
        + ["--write"])
    sections = {MARK: shared_markdown(args)}
    date = time.strftime("%Y-%m-%d")
    raw = {"command": command, "settings": SETTINGS, "args": vars(args), "notes": notes, "date": date, "tables": []}
    for model_key in models:
        model = MODELS[model_key]
        model_dir = scratch / "models" / model_key
        init_model(model.preset, model_dir, dtype="fp32", num_layers=model.layers)
        for dataset in datasets:
            table = Table(model_key, dataset)
            print(f"{model.preset} ({model.what}), {DATASETS[dataset]}", flush=True)
            timed = [c for c in chosen if dataset in c.datasets]
            for repeat in range(args.repeats):
                order = timed[repeat % len(timed):] + timed[:repeat % len(timed)]
                for contender in order + (checks if repeat == 0 else []):
                    work = scratch / "runs" / model_key / dataset / contender.key / str(repeat)
                    row = run_one(contender, model, model_dir, data_files[dataset], work, args)
                    table.runs.setdefault(contender.key, []).append(row)
                    print(describe(f"[{repeat + 1}] {contender.label}", row), flush=True)
            sections[f"{MARK}-{model_key}-{dataset}"] = table_markdown(table, args, command, notes[dataset], date)
            raw["tables"].append({"model": model_key, "dataset": dataset, "runs": table.runs})
            (scratch / "results.json").write_text(json.dumps(raw, indent=1, default=str))
            if args.write:  # table by table: a long run that is cut off keeps what it measured
                write_section(Path(args.out), MARK, sections[MARK])
                write_section(Path(args.out), f"{MARK}-{model_key}-{dataset}", sections[f"{MARK}-{model_key}-{dataset}"])
            print(sections[f"{MARK}-{model_key}-{dataset}"], flush=True)
        shutil.rmtree(model_dir)
    print(f"raw results and per-step loss curves: {scratch / 'results.json'}")
    print(f"wall time of the whole benchmark: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
