"""What MLX's evaluation order does to a training step: the step's need, its unconstrained peak and its seconds per
step at several widths of MLX's breadth-first tape (`MLX_BFS_MAX_WIDTH`, 20 unless set).

    python benchmarks/mlx_eval_order.py MODEL_DIR [--batch-size 1] [--seq-len 256] [--dtype bf16]
        [--no-grad-checkpointing] [--no-chunked-loss] [--widths 1,20] [--steps 3] [--repeats 2] [--write MARKER]

mlx/transforms.cpp builds the order it evaluates a graph in breadth first from the outputs, at most
MLX_BFS_MAX_WIDTH arrays a level before it goes down a level. A training step's outputs include every trained
parameter's gradient, so a wide order starts many layers' work before any of it is consumed; at width 1 the order
is depth first. Each run is memfit.mlx.measure in a fresh child (the trainer's own load, adapters, AdamW and
compiled step on random full-length rows) with MLX_BFS_MAX_WIDTH set in its environment: under a 1-byte memory limit
for the need (memfit.mlx.measure.run_steps says why), then with no limit for the peak and the speed, the widths in
rotated order for `--repeats` rounds. Peak: `mx.get_peak_memory()` over the steps, loading apart; seconds: the
median of the steps after the first (which compiles). `--write MARKER` puts the table in docs/benchmarks.md between
`<!-- MARKER -->` markers; otherwise it prints JSON.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mlx_memory_limit import report, run, step_config, step_parser  # noqa: E402  (the same child run and flags)


def measure(model_dir: str, config_values: dict, widths: list[int], steps: int, repeats: int) -> dict:
    """{"need": {width: run}, "free": {width: [runs]}}."""
    found: dict = {"need": {}, "free": {width: [] for width in widths}}
    for width in widths:
        found["need"][width] = run(model_dir, config_values, 1, steps, env={"MLX_BFS_MAX_WIDTH": str(width)})
    for round_index in range(repeats):
        shift = round_index % len(widths)
        for width in widths[shift:] + widths[:shift]:
            found["free"][width].append(run(model_dir, config_values, 0, steps,
                                            env={"MLX_BFS_MAX_WIDTH": str(width)}))
    return found


def markdown(found: dict, config_values: dict, model_dir: str, command: str) -> str:
    import mlx.core as mx
    from importlib import metadata

    hf = json.loads((Path(model_dir) / "config.json").read_text())
    widths = list(found["free"])
    base = found["free"][max(widths)]
    lines = [f"### MLX's evaluation order and the step: {hf['num_hidden_layers']} layers, hidden "
             f"{hf['hidden_size']}, vocabulary {hf['vocab_size']:,}, {config_values['batch_size']} x "
             f"{config_values['seq_len']} {config_values['dtype']}", "",
             f"Measured with `{command}` on {time.strftime('%Y-%m-%d')}, {platform.machine()} {platform.system()}, "
             f"MLX {mx.__version__} ({'Metal' if mx.metal.is_available() else 'CPU'}), mlx-lm "
             f"{metadata.version('mlx-lm')}. memfit's compiled trainer step (memfit.mlx.measure), LoRA, checkpointing "
             f"{'on' if config_values['grad_checkpointing'] else 'off'}, "
             f"{'the chunked loss' if config_values['chunked_loss'] else 'the full logits'}, a fresh process per run "
             "with MLX_BFS_MAX_WIDTH set, the widths in rotated order. Need: the peak under a 1-byte MLX memory "
             "limit; no limit: the peak and seconds per step without one (10^6 bytes; seconds: median of the steps "
             f"after the first); ÷ width {max(widths)}: against that width's run of the same round.", "",
             f"| MLX_BFS_MAX_WIDTH | need MB | peak with no limit MB (runs) | s/step (runs) | ÷ width {max(widths)}, "
             "s/step | loss |", "|---:|---:|---|---|---|---|"]
    for width in widths:
        runs = found["free"][width]
        peaks = ", ".join(f"{r['train_peak_bytes'] / 1e6:,.1f}" for r in runs)
        seconds = ", ".join(f"{r['seconds']:.2f}" for r in runs)
        ratios = ", ".join(f"{r['seconds'] / b['seconds']:.3f}" for r, b in zip(runs, base))
        lines.append(f"| {width} | {found['need'][width]['train_peak_bytes'] / 1e6:,.1f} | {peaks} | {seconds} | "
                     f"{ratios} | {runs[0]['loss']:.6f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = step_parser(__doc__.splitlines()[0])
    parser.add_argument("--widths", default="1,20", help="MLX_BFS_MAX_WIDTH values, comma-separated")
    args = parser.parse_args()
    config_values = step_config(args)
    widths = sorted(int(width) for width in args.widths.split(",") if width)
    found = measure(args.model_dir, config_values, widths, args.steps, args.repeats)
    return report(found, args, config_values, "mlx_eval_order.py", markdown)


if __name__ == "__main__":
    sys.exit(main())
