"""Estimator vs measured peak memory: real training steps in child processes, one per configuration.

For each case: build a random-init model of a real architecture (cut down in layers to fit 2 CPU cores), run 3
training steps in a fresh child (memfit.estimate.measure: peak RSS = the child's own VmHWM; on CUDA max_memory_reserved),
and compare with `estimate_memory` for the same configuration. Writes the table into docs/benchmarks.md.

    python benchmarks/estimate_accuracy.py [--device cpu|cuda] [--quick] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

MB = 1024**2
ARCHITECTURES = {  # preset -> layers kept
    "tiny": None,
    "smollm2-135m": 8,
    "qwen2.5-0.5b": 4,
    "gpt2": 6,
}
CASES = [
    dict(method="full", dtype="fp32", batch_size=2, seq_len=256),
    dict(method="full", dtype="bf16", batch_size=2, seq_len=256),
    dict(method="full", dtype="fp32", batch_size=2, seq_len=512, grad_checkpointing=True),
    dict(method="lora", dtype="fp32", batch_size=4, seq_len=256),
    dict(method="lora", dtype="fp32", batch_size=4, seq_len=512, grad_checkpointing=True),
    dict(method="lora", dtype="bf16", batch_size=2, seq_len=512),
    dict(method="lora", dtype="fp32", batch_size=8, seq_len=128, lora_layers=2),
    # The full-logits loss, for comparison with the (default) chunked loss of the same step above.
    dict(method="lora", dtype="fp32", batch_size=4, seq_len=256, chunked_loss=False),
]
# Published checkpoints are mostly stored in bf16; training in fp32 converts them while loading.
BF16_STORED = {"smollm2-135m": 8, "qwen2.5-0.5b": 4}
BF16_STORED_CASES = [
    dict(method="lora", dtype="fp32", batch_size=4, seq_len=256),
    dict(method="full", dtype="fp32", batch_size=2, seq_len=256),
]


def run(device: str, quick: bool) -> list[dict]:
    from transformers import AutoConfig

    from memfit.config import TrainConfig
    from memfit.estimate.measure import measure_in_child
    from memfit.estimate.memory import Hardware, estimate_memory
    from memfit.models import init_model

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        builds = [(preset, layers, "fp32", CASES[:3] if quick else CASES) for preset, layers in ARCHITECTURES.items()]
        builds += [(preset, layers, "bf16", BF16_STORED_CASES) for preset, layers in BF16_STORED.items() if not quick]
        for preset, layers, stored, cases in builds:
            model_dir = Path(scratch) / f"{preset}-{stored}"
            init_model(preset, model_dir, dtype=stored, num_layers=layers)
            hf_config = AutoConfig.from_pretrained(model_dir)
            for case in cases:
                config = TrainConfig(**case)
                predicted = estimate_memory(hf_config, config, Hardware(device, 1 << 40)).total_bytes
                started = time.time()
                measured = measure_in_child(model_dir, case, steps=3, device=device)
                peak = measured["max_memory_reserved_bytes"] if device == "cuda" else measured["peak_rss_bytes"]
                in_load = device != "cuda" and measured["load_peak_rss_bytes"] >= measured["peak_rss_bytes"]
                shape = ", ".join(([f"{layers} layers"] if layers else []) + (["bf16 file"] if stored != "fp32" else []))
                rows.append(dict(model=preset + (f" ({shape})" if shape else ""), case=case,
                                 estimate=predicted, measured=peak, error=(predicted - peak) / peak * 100,
                                 phase="load" if in_load else "step",
                                 seconds=time.time() - started))
                print(f"{rows[-1]['model']:28s} {case} est {predicted / MB:7.0f} MB  measured {peak / MB:7.0f} MB "
                      f" error {rows[-1]['error']:+5.1f}%", flush=True)
    return rows


def markdown(rows: list[dict], device: str) -> str:
    import torch
    import transformers

    worst = max(abs(row["error"]) for row in rows)
    lines = [
        f"### Estimator accuracy on {device} ({len(rows)} cases, worst error {worst:.1f}%)",
        "",
        f"Measured with `python benchmarks/estimate_accuracy.py --device {device}` on {platform.machine()} "
        f"{platform.system()}, {_cpu_name()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}. Each case: 3 training steps (AdamW) in a fresh child process on "
        "random full-length sequences; measured = the child's peak RSS (`VmHWM`; peak in: loading the model or a "
        "training step) "
        "(CUDA: `torch.cuda.max_memory_reserved`); estimate = `memfit estimate` for the same configuration.",
        "",
        "| model | method | dtype | batch × seq | grad ckpt | extra | estimate MB | measured MB | peak in | error |",
        "|---|---|---|---|---|---|---:|---:|---|---:|",
    ]
    for row in rows:
        case = row["case"]
        extra = " ".join(f"{key}={case[key]}" for key in ("lora_layers", "chunked_loss") if key in case)
        lines.append(f"| {row['model']} | {case['method']} | {case['dtype']} | {case['batch_size']} × "
                     f"{case['seq_len']} | {'on' if case.get('grad_checkpointing') else 'off'} | {extra} | "
                     f"{row['estimate'] / MB:,.0f} | {row['measured'] / MB:,.0f} | {row['phase']} | {row['error']:+.1f}% |")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({__import__('os').cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_section(path: Path, marker: str, body: str) -> None:
    """Replace the text between `<!-- marker -->` and `<!-- /marker -->` (append the section if missing)."""
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{start}\n{body}{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="3 cases per architecture")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    rows = run(args.device, args.quick)
    write_section(Path(args.out), f"estimate-accuracy-{args.device}", markdown(rows, args.device))
    print(f"wrote {args.out}; worst error {max(abs(r['error']) for r in rows):.1f}%")
    sys.exit(0)


if __name__ == "__main__":
    main()
