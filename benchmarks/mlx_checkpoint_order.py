"""What the order of a checkpointed backward pass does to an MLX training step: memfit's ordered checkpoint
(memfit.mlx.model.ordered_checkpoint) against mlx-lm's `grad_checkpoint` (plain `mx.checkpoint`), the rest of the
step memfit's own. A third contender, "ordered", is memfit's checkpoint with the order at every step size (memfit
leaves it out below memfit.mlx.model.ORDERED_FROM_TOKENS tokens a step).

    python benchmarks/mlx_checkpoint_order.py MODEL_DIR [--batch-size 1] [--seq-len 256] [--dtype bf16]
        [--no-chunked-loss] [--steps 3] [--repeats 2] [--write MARKER]

Each run is memfit.mlx.measure's `run_steps` in a fresh child (the trainer's own load, adapters, AdamW and compiled
step on random full-length rows, checkpointing on) with the layers checkpointed by one contender: first the need of
each (under a 1-byte MLX memory limit, memfit.mlx.measure.run_steps says why), then with no limit for the peak and
the speed, the contenders in rotated order for `--repeats` rounds. Peak: `mx.get_peak_memory()` over the steps,
loading apart; seconds: the median of the steps after the first (which compiles). `--write MARKER` puts the table in
docs/benchmarks.md between `<!-- MARKER -->` markers; otherwise it prints JSON.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mlx_memory_limit import report, step_config, step_parser  # noqa: E402  (the same model and step flags)

CONTENDERS = ("mlx-lm", "memfit", "ordered")


def child(contender: str, model_dir: str, config_values: dict, steps: int, limit: int) -> dict:
    """One run in this process: the layers checkpointed by `contender`."""
    import memfit.mlx.model as mlx_model
    from memfit.mlx.measure import run_steps

    if contender == "mlx-lm":
        from mlx_lm.tuner.trainer import grad_checkpoint

        mlx_model.grad_checkpoint = grad_checkpoint  # what load_for_training calls on the first layer
    elif contender == "ordered":
        mlx_model.ORDERED_FROM_TOKENS = 0  # read by ordered_checkpoint at each call
    found = run_steps(model_dir, config_values, steps, limit)
    return {"contender": contender, "limit_bytes": limit, "train_peak_bytes": found["train_peak_bytes"],
            "seconds": statistics.median(found["step_seconds"][1:] or found["step_seconds"]), "loss": found["loss"]}


def run(contender: str, model_dir: str, config_values: dict, steps: int, limit: int) -> dict:
    from memfit.runtime import run_python_json

    return run_python_json([str(Path(__file__).resolve()), "--child", contender, model_dir,
                            json.dumps(config_values), str(steps), str(limit)], timeout_s=7200)


def measure(model_dir: str, config_values: dict, steps: int, repeats: int) -> dict:
    """{"need": {contender: run}, "free": {contender: [runs]}}."""
    found: dict = {"need": {}, "free": {contender: [] for contender in CONTENDERS}}
    for contender in CONTENDERS:
        found["need"][contender] = run(contender, model_dir, config_values, steps, 1)
    for round_index in range(repeats):
        shift = round_index % len(CONTENDERS)
        for contender in CONTENDERS[shift:] + CONTENDERS[:shift]:
            found["free"][contender].append(run(contender, model_dir, config_values, steps, 0))
    return found


def markdown(found: dict, config_values: dict, model_dir: str, command: str) -> str:
    import mlx.core as mx
    from importlib import metadata

    hf = json.loads((Path(model_dir) / "config.json").read_text())
    base_need, base_free = found["need"]["mlx-lm"], found["free"]["mlx-lm"]
    lines = [f"### The checkpointed backward pass, ordered: {hf['num_hidden_layers']} layers, hidden "
             f"{hf['hidden_size']}, vocabulary {hf['vocab_size']:,}, {config_values['batch_size']} x "
             f"{config_values['seq_len']} {config_values['dtype']}", "",
             f"Measured with `{command}` on {time.strftime('%Y-%m-%d')}, {platform.machine()} {platform.system()}, "
             f"MLX {mx.__version__} ({'Metal' if mx.metal.is_available() else 'CPU'}), mlx-lm "
             f"{metadata.version('mlx-lm')}. memfit's compiled trainer step (memfit.mlx.measure), LoRA on every "
             "linear, checkpointing on, "
             f"{'the chunked loss' if config_values['chunked_loss'] else 'the full logits'}, a fresh process per run, "
             "the contenders in rotated order; only the layers' checkpoint differs. Need: the peak under a 1-byte MLX "
             "memory limit; no limit: the peak and seconds per step without one (10^6 bytes; seconds: median of the "
             "steps after the first); ÷ mlx-lm: against its run of the same round.", "",
             "| checkpoint | need MB | ÷ mlx-lm | peak with no limit MB (runs) | s/step (runs) | ÷ mlx-lm, s/step | "
             "loss |", "|---|---:|---:|---|---|---|---|"]
    labels = {"mlx-lm": "mlx-lm's `grad_checkpoint` (`mx.checkpoint`)",
              "memfit": "memfit's `ordered_checkpoint`",
              "ordered": "memfit's, ordered at every step size"}
    for contender in CONTENDERS:
        runs, need = found["free"][contender], found["need"][contender]
        peaks = ", ".join(f"{r['train_peak_bytes'] / 1e6:,.1f}" for r in runs)
        seconds = ", ".join(f"{r['seconds']:.2f}" for r in runs)
        ratios = ", ".join(f"{r['seconds'] / b['seconds']:.3f}" for r, b in zip(runs, base_free))
        lines.append(f"| {labels[contender]} | {need['train_peak_bytes'] / 1e6:,.1f} | "
                     f"{need['train_peak_bytes'] / base_need['train_peak_bytes']:.3f} | {peaks} | {seconds} | "
                     f"{ratios} | {need['loss']:.6f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        contender, model_dir, config_json, steps, limit = sys.argv[2:7]
        print(json.dumps(child(contender, model_dir, json.loads(config_json), int(steps), int(limit))))
        return 0
    parser = step_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    config_values = step_config(args) | {"grad_checkpointing": True}
    found = measure(args.model_dir, config_values, args.steps, args.repeats)
    return report(found, args, config_values, "mlx_checkpoint_order.py", markdown)


if __name__ == "__main__":
    sys.exit(main())
