"""Which cuts of a model should the estimator trace? Each choice against a trace of the whole depth.

The estimator traces a short and a long cut of the model and extrapolates per layer (memfit.estimate.cuts.
traced_peaks). This runs the same estimates three ways, each in a fresh process with an empty cache: the cuts
memfit uses (`cuts_of`: one period of layer kinds and two; 1 and 2 layers for most models), the 2- and 4-layer cuts
it used before, and the whole depth traced (the reference: no extrapolation). Reported: each estimate's total
against the reference, and the wall time of each way.

    python benchmarks/trace_cuts.py [--models smollm2-135m,llama-3.2-1b,gemma-2-2b] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from estimate_accuracy import _cpu_name, write_section  # benchmarks/ is on sys.path when run as a script

MARK = "trace-cuts"
WAYS = {"memfit's cuts": "memfit", "2 and 4 layers": "2,4", "whole depth (reference)": "all"}
SEQ = 1024


def child(way: str, models: list[str]) -> None:
    """Estimate every setting with the cuts `way` names; print one JSON object."""
    import time

    from memfit.config import make_config
    from memfit.estimate import cuts, memory
    from memfit.estimate.memory import Hardware, estimate_memory
    from memfit.models import resolve_model

    if way == "all":
        cuts.cuts_of = lambda hf_config, info: (info.num_layers,)
    elif way != "memfit":
        fixed = tuple(int(part) for part in way.split(","))
        cuts.cuts_of = lambda hf_config, info: (info.num_layers,) if info.num_layers <= fixed[1] else fixed
    settings = [(name, method, checkpointing, batch, SEQ) for name in models for method in ("lora", "full")
                for checkpointing in (False, True) for batch in (1, 2)]
    # examples/full-1b.yaml at the batches around its answer (batch 3 fits in 40 GB or not, by the cuts traced).
    settings += [("llama-3.2-1b", "full", False, batch, 2048) for batch in (3, 4)]
    rows, started = {}, time.perf_counter()
    for name, method, checkpointing, batch, seq in settings:
        config = make_config(method=method, grad_checkpointing=checkpointing, batch_size=batch, seq_len=seq)
        estimate = estimate_memory(resolve_model(name).config, config, Hardware("cuda", 80 * 1024**3))
        rows[f"{name}|{method}|{checkpointing}|{batch}|{seq}"] = estimate.total_bytes
    print(json.dumps({"rows": rows, "wall_s": time.perf_counter() - started,
                      "traced": memory.TRACE_STATS["traced"]}))


def run_way(way: str, models: list[str]) -> dict:
    env = {**os.environ, "MEMFIT_CACHE": tempfile.mkdtemp(prefix="trace-cuts-")}
    completed = subprocess.run([sys.executable, __file__, "--child", way, "--models", ",".join(models)],
                               capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        raise SystemExit(f"{way}: {completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,llama-3.2-1b,gemma-2-2b")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"))
    parser.add_argument("--child")
    args = parser.parse_args()
    models = args.models.split(",")
    if args.child:
        return child(args.child, models)
    load_before = os.getloadavg()[0]
    results = {label: run_way(way, models) for label, way in WAYS.items()}
    reference = results["whole depth (reference)"]["rows"]
    import torch
    import transformers

    lines = [
        "## Which cuts of a model the estimator traces",
        "",
        f"Measured with `python benchmarks/trace_cuts.py --write` on {platform.machine()} {platform.system()}, "
        f"{_cpu_name()}, Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after. Each "
        "way is one fresh process with an empty cache estimating every row (CUDA, default dtype rules); the whole-depth trace is the reference (no extrapolation over layers). memfit's cuts: one "
        "period of the config's `layer_types` and two (1 and 2 layers for smollm2 and llama, 2 and 4 for gemma-2's "
        "sliding/global pairs).",
        "",
        "| model | method | checkpointing | batch | seq | whole depth GB | " + " | ".join(
            f"{label}: error" for label in WAYS if label != "whole depth (reference)") + " |",
        "|---|---|---|---:|---:|---:|" + "---:|" * (len(WAYS) - 1),
    ]
    for key, truth in reference.items():
        name, method, checkpointing, batch, seq = key.split("|")
        errors = [f"{(results[label]['rows'][key] - truth) / truth * 100:+.2f}%" for label in WAYS
                  if label != "whole depth (reference)"]
        lines.append(f"| {name} | {method} | {'yes' if checkpointing == 'True' else 'no'} | {batch} | {seq} | "
                     f"{truth / 1024**3:.2f} | " + " | ".join(errors) + " |")
    lines += ["", "| way | traces | wall s (one process, all rows) |", "|---|---:|---:|"]
    for label, result in results.items():
        lines.append(f"| {label} | {result['traced']} | {result['wall_s']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        write_section(Path(args.out), MARK, text)


if __name__ == "__main__":
    main()
