"""What the MLX step needs by where the adapters are: the layers below every adapter and the linears left alone.

    python benchmarks/mlx_adapters.py [--preset tiny] [--layers 3] [--json] [--before FILE] [--write]

Each case is memfit.mlx.measure in a fresh child (the trainer's own load, adapters, AdamW and compiled step on random
full-length rows, 3 steps) under a 1-byte MLX memory limit: the step's need (memfit.mlx.measure.run_steps says why),
against `memfit estimate --engine mlx`'s `mlx_peak_bytes` for the same config. "Activations" is the need less the
estimate's exact part (weights, adapters, gradients, AdamW states: the estimate with every activation coefficient
0). MLX's value_and_grad computes only the cotangents a trained parameter needs, so what a layer keeps for the
backward pass depends on its adapters and on what trains below it (memfit.estimate.mlx_memory.layer_saves).

`--json` prints the rows; `--before FILE` adds the error of an earlier estimate from such a file (run the script
with PYTHONPATH set to an older checkout's src: the measurement is the same, the estimate is that checkout's);
`--write` puts the table in docs/benchmarks.md between `<!-- mlx-adapters -->` markers.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from estimate_accuracy import _method_label, publish  # noqa: E402  (the accuracy table's labels and writer)

MB = 10**6
BASE = dict(method="lora", batch_size=8, seq_len=128, chunked_loss=False, grad_checkpointing=False)
CASES = [
    dict(BASE, dtype="fp32"),
    dict(BASE, dtype="fp32", lora_layers=1),
    dict(BASE, dtype="fp32", lora_layers=2),
    dict(BASE, dtype="fp32", lora_targets="q_proj,v_proj"),
    dict(BASE, dtype="fp32", lora_targets="o_proj"),
    dict(BASE, dtype="fp32", lora_targets="gate_proj,up_proj"),
    dict(BASE, dtype="fp32", lora_targets="down_proj"),
    dict(BASE, dtype="bf16"),
    dict(BASE, dtype="bf16", lora_targets="q_proj,v_proj"),
    dict(BASE, dtype="bf16", lora_targets="down_proj"),
    dict(BASE, dtype="fp32", grad_checkpointing=True),
    dict(BASE, dtype="fp32", grad_checkpointing=True, lora_layers=1),
    dict(BASE, dtype="bf16", chunked_loss=True, lora_layers=1),
    dict(BASE, dtype="fp32", method="full"),
    dict(BASE, dtype="fp32", method="full", lora_layers=1),
    # Rank 512: the adapters' gradients (5.0M parameters: 19.9 MB) against where the step peaks
    # (memfit.estimate.mlx_memory.step_peak), and each adapted linear's x @ A (T x r fp32), which no term counts.
    dict(BASE, dtype="fp32", lora_rank=512),
    dict(BASE, dtype="fp32", grad_checkpointing=True, lora_rank=512),
]


def measure(preset: str, layers: int) -> list[dict]:
    from transformers import AutoConfig

    from memfit.config import TrainConfig
    from memfit.estimate.memory import Hardware
    from memfit.estimate.mlx_memory import TERMS, estimate_mlx
    from memfit.mlx.measure import measure_in_child
    from memfit.models import init_model

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = init_model(preset, Path(scratch) / preset, num_layers=layers)
        hf_config = AutoConfig.from_pretrained(model_dir)
        for case in CASES:
            config = TrainConfig(**case)
            need = measure_in_child(model_dir, case, steps=3, memory_limit_bytes=1)["train_peak_bytes"]
            exact = estimate_mlx(hf_config, config, Hardware("cpu", 1 << 40),
                                 coefficients={name: 0.0 for name in TERMS}).mlx_peak_bytes
            estimate = estimate_mlx(hf_config, config, Hardware("cpu", 1 << 40)).mlx_peak_bytes
            rows.append(dict(case=case, need=need, activations=need - exact, estimate=estimate,
                             error=(estimate - need) / need * 100))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict], before: list[dict] | None, command: str, preset: str, layers: int) -> str:
    import mlx.core as mx

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    earlier = {json.dumps(row["case"], sort_keys=True): row for row in before or []}
    lines = [f"### The MLX step's need by where the adapters are ({preset}, {layers} layers)", "",
             f"Measured with `{command}` at {commit} on {platform.machine()} {platform.system()}, MLX "
             f"{mx.__version__} (CPU). Each case: 3 steps of memfit's MLX trainer in a fresh child under a 1-byte "
             "MLX memory limit (the need); activations = the need less the estimate's exact part (weights, "
             "adapters, gradients, AdamW states); estimate = `memfit estimate --engine mlx`'s `mlx_peak_bytes`. "
             f"{BASE['batch_size']} × {BASE['seq_len']} rows, 10^6 bytes."
             + (" The earlier estimate: the same script with PYTHONPATH at an earlier checkout's src (`--json`, "
                "read with `--before`), its error against this run's need. A case's need is not the same in every "
                "run: the bf16 chunked row read 17.43, 17.12 and 15.83 MB in three runs on 2026-12-06, with other "
                "measurements on the other core (MLX's wait under its memory limit does not order every "
                "allocation)." if before else ""), "",
             "| adapters | dtype | grad ckpt | loss | need MB | activations MB | estimate MB | error |"
             + (" earlier estimate's error |" if before else ""),
             "|---|---|---|---|---:|---:|---:|---:|" + ("---:|" if before else "")]
    for row in rows:
        case = row["case"]
        old = earlier.get(json.dumps(case, sort_keys=True))
        label = _method_label(case) if case["method"] == "full" or case.get("lora_targets") or case.get(
            "lora_layers") else "lora (every linear, every layer)"
        label += f", r{case['lora_rank']}" if "lora_rank" in case else ""
        lines.append(f"| {label} | {case['dtype']} | {'on' if case['grad_checkpointing'] else 'off'} | "
                     f"{'chunked' if case['chunked_loss'] else 'full logits'} | {row['need'] / MB:,.2f} | "
                     f"{row['activations'] / MB:,.2f} | {row['estimate'] / MB:,.2f} | {row['error']:+.1f}% |"
                     + (f" {(old['estimate'] - row['need']) / row['need'] * 100:+.1f}% |" if old
                        else (" |" if before else "")))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--before", help="a --json file of an earlier estimate's run")
    parser.add_argument("--write", action="store_true", help="write docs/benchmarks.md's section")
    args = parser.parse_args()
    rows = measure(args.preset, args.layers)
    if args.json:
        print(json.dumps(rows))
        return
    before = json.loads(Path(args.before).read_text()) if args.before else None
    command = "python benchmarks/mlx_adapters.py" + "".join(
        f" {'BEFORE.json' if flag == args.before else flag}" for flag in sys.argv[1:])
    publish(markdown(rows, before, command, args.preset, args.layers), "mlx-adapters", args.write)


if __name__ == "__main__":
    main()
