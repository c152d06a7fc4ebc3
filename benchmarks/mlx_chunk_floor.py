"""The MLX chunked loss at several floors on a chunk (memfit.train.chunk_size.MLX_MIN_CHUNK_TOKENS): MLX's peak and
the seconds per step of memfit's compiled trainer step, each floor in a fresh child, the floors in rotated order.

    python benchmarks/mlx_chunk_floor.py MODEL_DIR [--floors 256,64,32,16] [--batch-size 4] [--seq-len 256]
        [--dtype bf16] [--no-grad-checkpointing] [--min-chunks N] [--steps 3] [--repeats 1] [--write MARKER]

Each child is memfit.mlx.measure's `run_steps` (the trainer's own load, adapters, AdamW and compiled
`MlxTrainer.optimizer_step` on random full-length rows) with the floor replaced for that process, so a floor under
which the step makes fewer than MLX_MIN_CHUNKS chunks runs the plain head, as the trainer would (`--min-chunks N`
replaces MLX_MIN_CHUNKS too: what fewer chunks hold against the plain head). Peak: MLX's
`mx.get_peak_memory()` over the steps (loading apart); seconds: the median of the steps after the first (which
compiles). MODEL_DIR is one `memfit init-model` wrote. `--write MARKER` puts the table in docs/benchmarks.md between
`<!-- MARKER -->` markers; otherwise it prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs" / "benchmarks.md"


def child(model_dir: str, config_values: dict, floor: int, steps: int, min_chunks: int | None) -> dict:
    """One floor's run in this process (a fresh interpreter: the parent starts one per floor)."""
    from memfit.train import chunk_size

    chunk_size.MLX_MIN_CHUNK_TOKENS = floor  # read by mlx_chunk_tokens at each call
    if min_chunks:
        chunk_size.MLX_MIN_CHUNKS = min_chunks  # read by mlx_chunks at each call
    from memfit.mlx.measure import run_steps

    found = run_steps(model_dir, config_values, steps)
    hf = json.loads((Path(model_dir) / "config.json").read_text())
    tokens = config_values["batch_size"] * config_values["seq_len"]
    return {"floor": floor, "chunk_tokens": chunk_size.mlx_chunks(tokens, hf["vocab_size"], hf["hidden_size"]),
            "train_peak_bytes": found["train_peak_bytes"], "step_seconds": found["step_seconds"], "loss": found["loss"]}


def measure(model_dir: str, config_values: dict, floors: list[int], steps: int, repeats: int,
            min_chunks: int | None = None) -> dict[int, list]:
    from memfit.runtime import run_python_json

    runs: dict[int, list] = {floor: [] for floor in floors}
    for round_index in range(repeats):
        order = floors[round_index % len(floors):] + floors[:round_index % len(floors)]
        for floor in order:
            runs[floor].append(run_python_json([__file__, "--child", str(floor), model_dir, json.dumps(config_values),
                                                "--steps", str(steps)]
                                               + (["--min-chunks", str(min_chunks)] if min_chunks else []),
                                               timeout_s=7200))
    return runs


def command_line(script: str, model_dir: str) -> str:
    """This run's command as the docs quote it: `taskset -c N` when pinned, the model directory as MODEL_DIR."""
    cores = sorted(os.sched_getaffinity(0))
    pinned = f"taskset -c {','.join(map(str, cores))} " if len(cores) < (os.cpu_count() or 1) else ""
    argv = " ".join(["MODEL_DIR" if a == model_dir else a for a in sys.argv[1:]])
    return f"{pinned}python benchmarks/{script} {argv}"


def markdown(runs: dict[int, list], config_values: dict, model_dir: str, command: str,
             min_chunks: int | None = None) -> str:
    import mlx.core as mx
    from importlib import metadata

    hf = json.loads((Path(model_dir) / "config.json").read_text())
    lines = [f"### MLX's chunked loss by the floor on a chunk: {hf['num_hidden_layers']} layers, vocabulary "
             f"{hf['vocab_size']:,}, hidden {hf['hidden_size']}", "",
             f"Measured with `{command}` on {time.strftime('%Y-%m-%d')}, {platform.machine()} {platform.system()}, "
             f"MLX {mx.__version__} ({'Metal' if mx.metal.is_available() else 'CPU'}), mlx-lm "
             f"{metadata.version('mlx-lm')}. memfit's compiled trainer step (memfit.mlx.measure's run_steps), LoRA, "
             f"{config_values['batch_size']} x {config_values['seq_len']} {config_values['dtype']}, checkpointing "
             f"{'on' if config_values['grad_checkpointing'] else 'off'}, "
             + (f"MLX_MIN_CHUNKS set to {min_chunks}, " if min_chunks else "")
             + "a fresh process per floor and repeat. Peak: "
             "`mx.get_peak_memory()` over the steps, loading apart, 10^6 bytes; seconds: median of the steps after "
             "the first.", "",
             "| floor (tokens) | chunk the step runs | peak MB (runs) | s/step (runs) | loss after the last step |",
             "|---:|---|---|---|---:|"]
    for floor, found in runs.items():
        chunk = found[0]["chunk_tokens"]
        peaks = ", ".join(f"{run['train_peak_bytes'] / 1e6:,.1f}" for run in found)
        seconds = ", ".join(f"{statistics.median(run['step_seconds'][1:] or run['step_seconds']):.2f}" for run in found)
        lines.append(f"| {floor} | {f'{chunk} tokens' if chunk else 'plain head (too few chunks)'} | {peaks} | "
                     f"{seconds} | {found[-1]['loss']:.6f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("config_json", nargs="?", help=argparse.SUPPRESS)  # --child only
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--floors", default="256,64,32,16")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--no-grad-checkpointing", action="store_true")
    parser.add_argument("--min-chunks", type=int, help="replace MLX_MIN_CHUNKS for the runs")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--write", metavar="MARKER")
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.model_dir, json.loads(args.config_json), args.child, args.steps,
                               args.min_chunks)))
        return 0
    config_values = {"method": "lora", "dtype": args.dtype, "batch_size": args.batch_size, "seq_len": args.seq_len,
                     "grad_checkpointing": not args.no_grad_checkpointing, "chunked_loss": True}
    runs = measure(args.model_dir, config_values, [int(f) for f in args.floors.split(",")], args.steps, args.repeats,
                   args.min_chunks)
    if not args.write:
        print(json.dumps({str(floor): found for floor, found in runs.items()}))
        return 0
    sys.path.insert(0, str(HERE))
    from estimate_accuracy import write_section

    write_section(DOCS, args.write, markdown(runs, config_values, args.model_dir,
                                              command_line("mlx_chunk_floor.py", args.model_dir), args.min_chunks))
    print(f"wrote {DOCS} ({args.write})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
