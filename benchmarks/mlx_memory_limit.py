"""What MLX's memory limit does to a training step: MLX's peak and the seconds per step of memfit's compiled trainer
step with no limit, under limits a little above the step's need, and under a 1-byte limit (the need itself).

    python benchmarks/mlx_memory_limit.py MODEL_DIR [--batch-size 1] [--seq-len 256] [--dtype bf16]
        [--no-grad-checkpointing] [--no-chunked-loss] [--headroom 0.05,0.25] [--steps 3] [--repeats 2] [--write MARKER]

MLX's eval allocates each op's output when it schedules the op, up to 10 ops ahead of the ops running
(mlx/transforms.cpp, MAX_ACTIVE_TASKS), and waits for the running ones first only while its active memory is over
the limit (memfit.mlx.measure.run_steps). memfit's MLX engine sets the limit to the arrays' share of the guard's
warning threshold (memfit.mlx.memory.arrays_limit_bytes): this measures what that costs in time and saves in memory.
Each run is memfit.mlx.measure in a fresh child (the trainer's own load, adapters, AdamW and compiled step on random
full-length rows), the limit set after the load. First the need (1 byte) and the unconstrained run; then each
`--headroom` h puts a limit at need x (1 + h); the modes run in rotated order for `--repeats` rounds. Peak:
`mx.get_peak_memory()` over the steps; seconds: the median of the steps after the first (which compiles).
`--write MARKER` puts the table in docs/benchmarks.md between `<!-- MARKER -->` markers; otherwise it prints JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs" / "benchmarks.md"


def run(model_dir: str, config_values: dict, limit: int, steps: int, env: dict | None = None) -> dict:
    from memfit.mlx.measure import measure_in_child

    found = measure_in_child(model_dir, config_values, steps=steps, timeout_s=7200, env=env,
                             memory_limit_bytes=limit)
    return {"limit_bytes": limit, "train_peak_bytes": found["train_peak_bytes"],
            "seconds": statistics.median(found["step_seconds"][1:] or found["step_seconds"]), "loss": found["loss"]}


def measure(model_dir: str, config_values: dict, headrooms: list[float], steps: int, repeats: int) -> dict[str, list]:
    """Runs per mode: "none", "need" and "+h%" for each headroom (limit need x (1 + h), from the first need run)."""
    runs: dict[str, list] = {"none": [], "need": []}
    runs["need"].append(run(model_dir, config_values, 1, steps))
    need = runs["need"][0]["train_peak_bytes"]
    limits = {"none": 0, "need": 1, **{f"+{h:.0%}": int(need * (1 + h)) for h in headrooms}}
    runs.update({mode: [] for mode in limits if mode not in runs})
    modes = list(limits)
    for round_index in range(repeats):
        order = modes[round_index % len(modes):] + modes[:round_index % len(modes)]
        for mode in order:
            if mode == "need" and round_index == 0:
                continue  # measured first, for the limits
            runs[mode].append(run(model_dir, config_values, limits[mode], steps))
    return runs


def markdown(runs: dict[str, list], config_values: dict, model_dir: str, command: str) -> str:
    import mlx.core as mx
    from importlib import metadata

    hf = json.loads((Path(model_dir) / "config.json").read_text())
    free = runs["none"]
    lines = [f"### MLX's memory limit and the step: {hf['num_hidden_layers']} layers, vocabulary "
             f"{hf['vocab_size']:,}, hidden {hf['hidden_size']}", "",
             f"Measured with `{command}` on {time.strftime('%Y-%m-%d')}, {platform.machine()} {platform.system()}, "
             f"MLX {mx.__version__} ({'Metal' if mx.metal.is_available() else 'CPU'}), mlx-lm "
             f"{metadata.version('mlx-lm')}. memfit's compiled trainer step (memfit.mlx.measure), LoRA, "
             f"{config_values['batch_size']} x {config_values['seq_len']} {config_values['dtype']}, checkpointing "
             f"{'on' if config_values['grad_checkpointing'] else 'off'}, "
             f"{'the chunked loss' if config_values['chunked_loss'] else 'the full logits'}, a fresh process per run, "
             "the modes in rotated order. Peak: `mx.get_peak_memory()` over the steps, loading apart, 10^6 bytes; "
             "seconds: median of the steps after the first; ÷ none: against the unconstrained run of the same round.",
             "", "| MLX memory limit | limit MB | peak MB (runs) | s/step (runs) | ÷ none, s/step |",
             "|---|---:|---|---|---|"]
    labels = {"none": "none (MLX runs ahead)", "need": "1 byte (the need: waits before every op)"}
    for mode, found in runs.items():
        label = labels.get(mode, f"need {mode}")
        limit = found[0]["limit_bytes"]
        peaks = ", ".join(f"{r['train_peak_bytes'] / 1e6:,.1f}" for r in found)
        seconds = ", ".join(f"{r['seconds']:.2f}" for r in found)
        ratios = ", ".join(f"{r['seconds'] / f['seconds']:.3f}" for r, f in zip(found[-len(free):], free))
        lines.append(f"| {label} | {limit / 1e6:,.1f} | {peaks} | {seconds} | {ratios} |" if limit > 1 else
                     f"| {label} | {'-' if not limit else '0.0'} | {peaks} | {seconds} | {ratios} |")
    return "\n".join(lines) + "\n"


def step_parser(description: str) -> argparse.ArgumentParser:
    """The model and step flags this script and mlx_eval_order.py share (the run flags are each script's own)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("model_dir")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--no-grad-checkpointing", action="store_true")
    parser.add_argument("--no-chunked-loss", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--write", metavar="MARKER")
    return parser


def step_config(args) -> dict:
    """The TrainConfig values of the step `step_parser`'s flags describe (LoRA)."""
    return {"method": "lora", "dtype": args.dtype, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "grad_checkpointing": not args.no_grad_checkpointing, "chunked_loss": not args.no_chunked_loss}


def report(found, args, config_values: dict, script: str, markdown) -> int:
    """What a `step_parser` script found: JSON on stdout, or with `--write MARKER` the table `markdown(found,
    config_values, model_dir, command)` makes, in docs/benchmarks.md between the markers."""
    if not args.write:
        print(json.dumps(found))
        return 0
    sys.path.insert(0, str(HERE))
    from estimate_accuracy import write_section
    from mlx_chunk_floor import command_line

    write_section(DOCS, args.write, markdown(found, config_values, args.model_dir,
                                              command_line(script, args.model_dir)))
    print(f"wrote {DOCS} ({args.write})")
    return 0


def main() -> int:
    parser = step_parser(__doc__.splitlines()[0])
    parser.add_argument("--headroom", default="0.05,0.25", help="limits at need x (1 + h), comma-separated")
    args = parser.parse_args()
    config_values = step_config(args)
    headrooms = [float(h) for h in args.headroom.split(",") if h]
    runs = measure(args.model_dir, config_values, headrooms, args.steps, args.repeats)
    return report(runs, args, config_values, "mlx_memory_limit.py", markdown)


if __name__ == "__main__":
    sys.exit(main())
