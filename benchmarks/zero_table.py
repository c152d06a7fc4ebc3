"""What each ZeRO stage saves per GPU, computed by the estimator: `memfit estimate --json` for Llama-3.1-8B and
Llama-3.1-70B, full fine-tune and LoRA, on 8 GPUs of 80 GB, at ZeRO 0 (DDP), 1, 2, 3 and 3 with CPU offload.
Prints the markdown table the README's "Scaling out" section shows.

Setup of every cell: bf16 mixed precision, AdamW, micro-batch 1, seq-len 2048, gradient checkpointing, LoRA rank
16 on all linear layers, the chunked loss (memfit's default). No weights are needed: the built-in architectures'
published shapes are enough for the estimator.

    python benchmarks/zero_table.py [--seq-len 2048] [--memory-gb 80] [--num-gpus 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

GB = 1024**3
MODELS = [("llama-3.1-8b", "Llama-3.1-8B"), ("llama-3.1-70b", "Llama-3.1-70B")]
METHODS = [("full", "full"), ("lora", "LoRA")]
STAGES = [("0 (DDP)", ["--distributed", "ddp"]), ("1", ["--distributed", "zero1"]), ("2", ["--distributed", "zero2"]),
          ("3", ["--distributed", "zero3"]), ("3 + offload", ["--distributed", "zero3", "--offload", "cpu"])]


def estimate(model: str, method: str, stage_flags: list[str], args) -> dict:
    command = [sys.executable, "-m", "memfit", "estimate", "--model", model, "--method", method, "--device", "cuda",
               "--memory-gb", str(args.memory_gb), "--num-gpus", str(args.num_gpus), "--dtype", "bf16",
               "--optimizer", "adamw", "--batch-size", "1", "--seq-len", str(args.seq_len), "--grad-checkpointing",
               "--no-calibrate", "--json", *stage_flags]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def cell(result: dict, baseline: dict) -> str:
    total = result["total_bytes"] / GB
    mark = "fits" if result["fits"] else "**does not fit**"
    text = f"{total:,.1f} GB, {mark}"
    saved = (baseline["total_bytes"] - result["total_bytes"]) / GB
    if result is not baseline:
        text += f" (−{saved:,.1f} GB)"
    if result["host_offload_bytes"]:
        text += f"; {result['host_offload_bytes'] / GB:,.0f} GB CPU RAM per node"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--memory-gb", type=float, default=80)
    parser.add_argument("--num-gpus", type=int, default=8)
    args = parser.parse_args()
    columns = [(model, label, method, method_label) for model, label in MODELS for method, method_label in METHODS]
    results = {(model, method): [estimate(model, method, flags, args) for _, flags in STAGES]
               for model, _, method, _ in columns}
    header = ["ZeRO stage"] + [f"{label} {method_label}" for _, label, _, method_label in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, (stage, _) in enumerate(STAGES):
        row = [stage] + [cell(results[(model, method)][index], results[(model, method)][0])
                         for model, _, method, _ in columns]
        lines.append("| " + " | ".join(row) + " |")
    print("\n".join(lines))
    print()
    print(f"Per GPU, {args.num_gpus} GPUs of {args.memory_gb:g} GB, bf16 mixed precision, AdamW, micro-batch 1, "
          f"seq-len {args.seq_len}, gradient checkpointing; in brackets what the stage saves against ZeRO 0.")


if __name__ == "__main__":
    main()
