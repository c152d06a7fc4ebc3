"""Derive the estimator's CPU process-baseline constants on this machine, and write them where the estimator reads
them (src/memfit/estimate/constants.json).

    python benchmarks/derive_constants.py [--repeats 5] [--out src/memfit/estimate/constants.json] [--dry-run]
                                          [--write]   (also the docs/benchmarks.md section)
    python benchmarks/derive_constants.py --render --write   (that section from constants.json, measuring nothing)

The estimator's CPU runtime term (memfit.estimate.baseline.runtime_bytes) is what a training process holds when the
model holds nothing: anonymous memory (Python, torch, transformers, the model code, memfit, one step run; PEFT, and
the bitsandbytes it may import, for adapters) plus file-backed pages (the shared libraries). Each is measured here
in fresh child processes, `--repeats` times each, from /proc/self/status (RssAnon, RssFile, VmHWM) and
/proc/self/smaps_rollup:

- `empty`: `python -c` with nothing imported (for reference);
- `imports`: torch, transformers and the llama model code imported and a tiny backward run (for reference; what
  `python benchmarks/figures.py runtime` measured before this script);
- `train-full`, `train-lora`, `train-qlora`: a real training child (memfit.estimate.measure.run_steps, the one the
  accuracy table and test measure) of a *nano* llama (1 layer, hidden 64, vocab 512: ~0.2 MB of weights) for 3
  steps, full fp32 / LoRA (PEFT without bitsandbytes, as memfit.train.loop imports it for --quant none) / QLoRA
  4-bit (PEFT with bitsandbytes): a training process whose model-dependent memory is nil, so its RssAnon is the
  anonymous baseline;
- `estimate-full`, `estimate-lora`, `estimate-qlora`: a process that estimates the same configuration (the traces
  import what they import) and reads its own RssFile where memfit.estimate.baseline.cpu_file_pages_bytes reads it.

Derived (medians over the repeats):
  process_anon_bytes         = RssAnon(train-full)
  peft_import_bytes          = RssAnon(train-qlora) - RssAnon(train-full)
  bitsandbytes_import_bytes  = RssAnon(train-qlora) - RssAnon(train-lora)
  file_pages_ratio           = median over the 3 kinds of RssFile(train-KIND) / RssFile(estimate-KIND)
  file_pages_fallback_bytes  = RssFile(estimate-lora)   (used where /proc is absent)

File-backed pages depend on the page cache (a fresh install maps more than an aged one), which is why the estimator
reads its own process's RssFile and applies the ratio rather than storing bytes. Anonymous memory depends on the
machine (glibc keeps a malloc arena per thread, and torch starts a thread per core), so rerun this script on the
machine whose figures you publish; the file records the machine, versions and command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from memfit.runtime import run_python_json

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = ROOT / "src" / "memfit" / "estimate" / "constants.json"
MB = 1024**2

# Reads this process's memory counters (bytes) and prints them as one JSON line.
_READ = r"""
def _counters():
    out = {}
    for line in open('/proc/self/status'):
        key, _, value = line.partition(':')
        if key in ('RssAnon', 'RssFile', 'RssShmem', 'VmRSS', 'VmHWM'):
            out[key] = int(value.split()[0]) * 1024
    try:
        for line in open('/proc/self/smaps_rollup'):
            key, _, value = line.partition(':')
            if key in ('Rss', 'Pss', 'Anonymous', 'Private_Dirty', 'Shared_Clean', 'Private_Clean') and value.strip():
                out['smaps_' + key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out
"""

_CHILDREN = {
    "empty": _READ + "import json; print(json.dumps(_counters()))\n",
    "imports": _READ + (
        "import json, torch, transformers\n"
        "from transformers import AutoModelForCausalLM\n"
        "import transformers.models.llama.modeling_llama\n"
        "x = torch.randn(64, 64, requires_grad=True); (x @ x).sum().backward()\n"
        "print(json.dumps(_counters()))\n"),
    "train": _READ + (
        "import json, sys\n"
        "from memfit.estimate.measure import run_steps\n"
        "run_steps(sys.argv[1], json.loads(sys.argv[2]), 3, 'cpu')\n"
        "print(json.dumps(_counters()))\n"),
    "estimate": _READ + (
        "import json, sys\n"
        "from transformers import AutoConfig\n"
        "from memfit.config import TrainConfig\n"
        "from memfit.libraries import hide_bitsandbytes_from_peft\n"
        "from memfit.estimate.memory import GB, Hardware, estimate_memory\n"
        "hide_bitsandbytes_from_peft()  # as `memfit estimate` does (memfit.cli)\n"
        "estimate_memory(AutoConfig.from_pretrained(sys.argv[1]), TrainConfig(**json.loads(sys.argv[2])),\n"
        "                Hardware('cpu', 16 * GB))\n"
        "print(json.dumps(_counters()))\n"),
}

KINDS = {
    "full": dict(method="full", dtype="fp32", batch_size=1, seq_len=16),
    "lora": dict(method="lora", dtype="fp32", batch_size=1, seq_len=16),
    "qlora": dict(method="qlora", dtype="fp32", batch_size=1, seq_len=16),
}
NANO = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)


def child(kind: str, *args: str, cache: str) -> dict:
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MEMFIT_CACHE": cache,
           "TRANSFORMERS_VERBOSITY": "error"}
    return run_python_json(["-c", _CHILDREN[kind], *args], timeout_s=600, env=env)


def measure(repeats: int, log=print) -> dict[str, list[dict]]:
    from memfit.models import init_model

    readings: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        model = init_model("tiny", Path(scratch) / "nano", num_layers=1, overrides=NANO)
        runs = [("empty", ()), ("imports", ())]
        for name, case in KINDS.items():
            runs += [(f"train-{name}", ("train", str(model), json.dumps(case))),
                     (f"estimate-{name}", ("estimate", str(model), json.dumps(case)))]
        for repeat in range(repeats):  # interleaved, so a drift of the page cache spreads over every stage
            for stage, spec in runs:
                kind, args = (spec[0], spec[1:]) if spec else (stage, ())
                # A fresh cache each time: an estimate from cached traces would import less than one that traces.
                cache = tempfile.mkdtemp(dir=scratch)
                started = time.time()
                reading = child(kind, *args, cache=cache)
                readings.setdefault(stage, []).append(reading)
                log(f"[{repeat + 1}/{repeats}] {stage:15s} RssAnon {reading['RssAnon'] / MB:6.1f} MB  RssFile "
                    f"{reading['RssFile'] / MB:6.1f} MB  VmHWM {reading['VmHWM'] / MB:6.1f} MB  "
                    f"({time.time() - started:.1f} s)")
    return readings


def derive(readings: dict[str, list[dict]]) -> dict:
    def median(stage: str, key: str) -> float:
        return statistics.median(r[key] for r in readings[stage])

    anon = {kind: median(f"train-{kind}", "RssAnon") for kind in KINDS}
    ratios = [median(f"train-{kind}", "RssFile") / median(f"estimate-{kind}", "RssFile") for kind in KINDS]
    return {
        "process_anon_bytes": int(anon["full"]),
        "peft_import_bytes": int(anon["qlora"] - anon["full"]),
        "bitsandbytes_import_bytes": int(anon["qlora"] - anon["lora"]),
        "file_pages_ratio": round(statistics.median(ratios), 3),
        "file_pages_fallback_bytes": int(median("estimate-lora", "RssFile")),
    }


def summary(readings: dict[str, list[dict]]) -> dict:
    out = {}
    for stage, rows in readings.items():
        out[stage] = {key: {"median": int(statistics.median(r[key] for r in rows)),
                            "min": min(r[key] for r in rows), "max": max(r[key] for r in rows)}
                      for key in rows[0]}
    return out


def machine() -> dict:
    sys.path.insert(0, str(HERE))
    from estimate_accuracy import _cpu_name

    try:
        total = int(next(line for line in open("/proc/meminfo") if line.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        total = None
    return {"system": f"{platform.system()} {platform.release()}", "machine": platform.machine(), "cpu": _cpu_name(),
            "cores": os.cpu_count(), "memory_bytes": total, "libc": " ".join(platform.libc_ver())}


def versions() -> dict:
    import importlib.metadata as metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "memfit"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


OLD = {"process_anon_bytes": "244 MB", "peft_import_bytes": "82 MB", "bitsandbytes_import_bytes": "43 MB",
       "file_pages_ratio": "1.33", "file_pages_fallback_bytes": "97 MB"}  # hand-set before this script


def markdown(data: dict) -> str:
    r, m, v = data["readings"], data["machine"], data["versions"]

    def cell(stage: str, key: str) -> str:
        x = r[stage][key]
        return f"{x['median'] / MB:,.1f} ({x['min'] / MB:,.1f}–{x['max'] / MB:,.1f})"

    lines = [
        "## The estimator's CPU baseline, derived", "",
        f"Measured with `{data['command']}` at {data['measured_at']} on {m['machine']} {m['system']}, {m['cpu']}, "
        f"{m['libc']}; Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, "
        f"bitsandbytes {v['bitsandbytes']}. Each stage a fresh process, {data['repeats']} times, interleaved; "
        "median (min–max) MB from /proc/self/status. `train-*`: 3 training steps of a nano llama (~0.2 MB of "
        "weights) in memfit.estimate.measure's child; `estimate-*`: a process that estimated the same "
        "configuration. The estimator reads the derived figures from `memfit/estimate/constants.json`.", "",
        "| stage | RssAnon MB | RssFile MB | VmHWM MB |", "|---|---:|---:|---:|"]
    for stage in r:
        lines.append(f"| {stage} | {cell(stage, 'RssAnon')} | {cell(stage, 'RssFile')} | {cell(stage, 'VmHWM')} |")
    lines += ["", "| constant | derived | hand-set before |", "|---|---:|---:|"]
    for key, value in data["cpu"].items():
        shown = f"{value / MB:,.1f} MB" if key.endswith("bytes") else str(value)
        lines.append(f"| `{key}` | {shown} | {OLD.get(key, '—')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per stage (default 5)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="the data file the estimator reads")
    parser.add_argument("--dry-run", action="store_true", help="print the derived constants, write nothing")
    parser.add_argument("--write", action="store_true", help="also write the docs/benchmarks.md section")
    parser.add_argument("--render", action="store_true", help="only render the section from the --out file")
    parser.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.render:
        text = markdown(json.loads(Path(args.out).read_text()))
        print(text)
        if args.write:
            _write_docs(Path(args.docs), text)
        return
    readings = measure(args.repeats)
    constants = derive(readings)
    command = "python benchmarks/derive_constants.py" + (f" --repeats {args.repeats}" if args.repeats != 5 else "")
    data = {
        "about": "The estimator's CPU process baseline (memfit.estimate.memory), derived by benchmarks/"
                 "derive_constants.py on the machine below; rerun it there to refresh. Bytes; medians.",
        "command": command,
        "measured_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "repeats": args.repeats,
        "machine": machine(),
        "versions": versions(),
        "cpu": constants,
        "readings": summary(readings),
    }
    for key, value in constants.items():
        print(f"{key:28s} {value / MB:8.1f} MB" if key.endswith("bytes") else f"{key:28s} {value}")
    if not args.dry_run:
        Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {args.out}")
        if args.write:
            _write_docs(Path(args.docs), markdown(data))


def _write_docs(path: Path, text: str) -> None:
    sys.path.insert(0, str(HERE))
    from estimate_accuracy import write_section

    write_section(path, "derive-constants", text)
    print(f"wrote section derive-constants of {path}")


if __name__ == "__main__":
    main()
