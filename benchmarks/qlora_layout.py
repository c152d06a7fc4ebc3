"""QLoRA's two layouts on CPU: the unquantized weights (embeddings, norms, lm_head) in the compute dtype (memfit's
default) vs fp32 (`--qlora-upcast`, PEFT's prepare_model_for_kbit_training): per-step losses and peak RSS.

For each base (4-bit nf4, 8-bit), `memfit train` runs twice in fresh processes on the same random-init model
(`memfit init-model`, real shapes, a layer cut), the same seed and the same rows, bf16 mixed precision; only the
layout differs. Reported: the largest per-step loss difference between the two, each run's peak RSS (VmHWM), and
what the estimator predicts for each (run.json's estimate).

    python benchmarks/qlora_layout.py [--preset smollm2-135m] [--layers 4] [--steps 50] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from importlib import metadata, resources
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from estimate_accuracy import write_section  # noqa: E402
from train_vs_hf import _busy_cpu_s, cpu_name  # noqa: E402

MARK = "qlora-layout"
MB = 1024**2
# Each run's shape: packed rows of the built-in dataset, the same for both layouts (same seed, same data order).
SHAPE = {"--seq-len": "256", "--batch-size": "4", "--lr": "1e-3", "--warmup-steps": "5", "--lora-rank": "16"}
# The loss curves count as equivalent when no step differs by more than this (about 0.1% of a loss near 10).
TOLERANCE = 0.01


def run(model_dir: Path, out: Path, quant: str, upcast: bool, steps: int, dtype: str) -> dict:
    data = str(resources.files("memfit").joinpath("data/demo.jsonl"))
    command = [sys.executable, "-m", "memfit", "train", "--model", str(model_dir), "--data", data,
               "--output-dir", str(out), "--method", "qlora", "--quant", quant, "--dtype", dtype, "--device", "cpu",
               "--seed", "0", "--max-steps", str(steps), "--save-every", "100000",
               "--memory-report-interval", "100000", *(x for item in SHAPE.items() for x in item),
               *(["--qlora-upcast"] if upcast else [])]
    busy_before, cpu_before = _busy_cpu_s(), _children_cpu_s()
    started = time.monotonic()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.monotonic() - started
    # Cores' worth of CPU the rest of the machine used meanwhile: above ~0.2, tokens/s and wall are slowed by it.
    other = (_busy_cpu_s() - busy_before - (_children_cpu_s() - cpu_before)) / wall if busy_before else None
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["config"]["qlora_upcast"] is upcast and run_json["config"]["quant"] == quant
    settled = metrics[1:]
    return {"losses": [m["loss"] for m in metrics], "peak_rss_bytes": max(m["peak_rss_bytes"] for m in metrics),
            "estimate_bytes": run_json.get("estimate_bytes"), "wall_s": wall, "other_load": other,
            "tokens_per_s": sum(m["tokens"] for m in settled) / sum(m["step_time_s"] for m in settled)}


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def estimated_weights(model_dir: Path, quant: str, upcast: bool, dtype: str) -> int:
    """The estimator's weights term for the run (its unquantized part is what the layouts change)."""
    from memfit.config import TrainConfig
    from memfit.models.arch import arch_info
    from memfit.estimate.memory import resolve_dtypes, weight_bytes
    from memfit.models import resolve_model

    config = TrainConfig(method="qlora", quant=quant, dtype=dtype, qlora_upcast=upcast)
    return weight_bytes(arch_info(resolve_model(str(model_dir)).config), config, resolve_dtypes(dtype, "cpu"))


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def markdown(rows: list[dict], args: argparse.Namespace, params: int) -> str:
    import torch

    versions = ", ".join(f"{name} {metadata.version(name)}" for name in ("transformers", "peft", "bitsandbytes"))
    command = "python benchmarks/qlora_layout.py" + (
        f" --preset {args.preset}" if args.preset != "smollm2-135m" else "") + (
        f" --layers {args.layers}" if args.layers != 4 else "") + (
        f" --steps {args.steps}" if args.steps != 50 else "") + " --write"
    shape = " ".join(f"{flag} {value}" for flag, value in SHAPE.items())
    lines = [
        "## QLoRA: unquantized weights in the compute dtype vs fp32 (`--qlora-upcast`)",
        "",
        f"Measured with `{command}` on {platform.machine()} {platform.system()}, {cpu_name()}; Python "
        f"{platform.python_version()}, torch {torch.__version__}, {versions}; commit {_commit()}, "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        f"Model: `memfit init-model --preset {args.preset} --layers {args.layers} --dtype bf16` (random init, "
        f"{params / 1e6:.1f}M params, stored in bf16 as the published checkpoint is). Each row pair is two fresh "
        f"`memfit train --method qlora --quant Q --dtype {args.dtype} --device cpu --seed 0 --max-steps "
        f"{args.steps} {shape}` processes on the built-in dataset (packed), identical but for `--qlora-upcast`: "
        "same initial weights, LoRA init, rows and order. Default: embeddings, norms and lm_head stay in "
        f"{args.dtype} (the compute dtype); `--qlora-upcast`: PEFT's prepare_model_for_kbit_training casts them to "
        "fp32. LoRA adapters are fp32 and the linear layers k-bit in both. Peak RSS is the training process's "
        "VmHWM (loading included); the estimate is run.json's `estimate_bytes`, its weights term the estimator's. "
        "Other load: cores' worth of CPU the rest of the machine used during the run (/proc/stat busy time minus "
        "the run's own); above ~0.2 that row's tokens/s and wall time are slowed by it.",
        "",
        "| base | layout | peak RSS (MB) | estimate (MB) | estimated weights (MB) | first loss | last loss | "
        "max abs Δ loss vs upcast | tokens/s | wall (s) | other load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        delta = "–" if row["upcast"] else f"{row['max_delta']:.2e} (step {row['worst_step']})"
        estimate = f"{row['estimate_bytes'] / MB:,.0f}" if row["estimate_bytes"] else "–"
        lines.append(
            f"| {'4-bit nf4' if row['quant'] == '4' else '8-bit'} | "
            f"{'`--qlora-upcast` (fp32)' if row['upcast'] else f'default ({args.dtype})'} | "
            f"{row['peak_rss_bytes'] / MB:,.0f} | {estimate} | {row['weights'] / MB:,.1f} | "
            f"{row['losses'][0]:.4f} | {row['losses'][-1]:.4f} | {delta} | {row['tokens_per_s']:,.0f} | "
            f"{row['wall_s']:.0f} | {'–' if row['other_load'] is None else format(row['other_load'], '.1f')} |")
    lines += ["", f"Targets: every step's loss within {TOLERANCE} of the upcast run's; the default's peak below the "
                  "upcast's.", ""]
    for quant in args.quant:
        default, upcast = (next(r for r in rows if r["quant"] == quant and r["upcast"] is u) for u in (False, True))
        saved = upcast["peak_rss_bytes"] - default["peak_rss_bytes"]
        predicted = upcast["weights"] - default["weights"]
        verdict = "met" if default["max_delta"] <= TOLERANCE else "NOT met"
        lines.append(f"- {'4-bit' if quant == '4' else '8-bit'}: max abs Δ loss over {len(default['losses'])} steps "
                     f"{default['max_delta']:.2e} — {verdict}; peak RSS {saved / MB:+,.0f} MB saved by the default "
                     f"({saved / upcast['peak_rss_bytes']:.1%} of the upcast run's), estimated "
                     f"{predicted / MB:+,.0f} MB (weights term)")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the cut (time on 2 cores)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--dtype", default="bf16", help="compute dtype of both runs (bf16: CPU autocast)")
    parser.add_argument("--quant", nargs="+", default=["4", "8"])
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"))
    args = parser.parse_args()

    from memfit.models import init_model
    from memfit.models.resolve import resolve_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = init_model(args.preset, Path(tmp) / "model", dtype="bf16", num_layers=args.layers)
        from memfit.models.arch import arch_info

        params = arch_info(resolve_model(str(model_dir)).config).params
        for quant in args.quant:
            pair = {}
            for upcast in (True, False):
                result = run(model_dir, Path(tmp) / f"q{quant}-{'upcast' if upcast else 'default'}", quant,
                             upcast, args.steps, args.dtype)
                result.update(quant=quant, upcast=upcast,
                              weights=estimated_weights(model_dir, quant, upcast, args.dtype))
                pair[upcast] = result
                print(f"quant {quant} {'upcast ' if upcast else 'default'}: peak {result['peak_rss_bytes'] / MB:,.0f}"
                      f" MB, losses {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}, "
                      f"{result['wall_s']:.0f} s", flush=True)
            deltas = [abs(a - b) for a, b in zip(pair[False]["losses"], pair[True]["losses"], strict=True)]
            pair[False]["max_delta"] = max(deltas)
            pair[False]["worst_step"] = deltas.index(max(deltas)) + 1
            pair[True]["max_delta"] = 0.0
            rows += [pair[False], pair[True]]
    table = markdown(rows, args, params)
    print(table)
    if args.write:
        if set(args.quant) != {"4", "8"}:
            sys.exit("--write needs both bases (--quant 4 8)")
        write_section(Path(args.out), MARK, table)


if __name__ == "__main__":
    main()
