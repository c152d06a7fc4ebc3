"""Estimator vs measured peak memory: real training steps in child processes, one per configuration.

For each case: build a random-init model of a real architecture (cut down in layers to fit 2 CPU cores), run 3
training steps in a fresh child (memfit.estimate.measure: peak RSS = the child's own VmHWM; on CUDA max_memory_reserved),
and compare with `estimate_memory` for the same configuration. Writes the table into docs/benchmarks.md.

Two errors per case: on the whole peak, and on its model-dependent part (peak - baseline, where baseline is the
estimate's process baseline, `Estimate.baseline_bytes`: on CPU the constants benchmarks/derive_constants.py measured
plus this machine's library pages). The same baseline comes off both sides, so the second is the same absolute
error over a smaller figure: it is what the constants cannot hide. smollm2-135m at its whole depth (30 layers,
135M params) is the case where the model-dependent part dominates.

    python benchmarks/estimate_accuracy.py [--device cpu|cuda] [--quick | --moe] [--write [--out docs/benchmarks.md]]
    python benchmarks/estimate_accuracy.py --engine mlx [--quick | --only tiny,smollm2-135m:1] [--write]

Without --write the table is printed, not written.

With `--engine mlx`: memfit's MLX engine (mlx[cpu] here). Each case runs 3 steps of the MLX trainer's own compiled
step in two fresh children at once (memfit.mlx.measure), each pinned to a core of its own (`_cores`), one under a
1-byte MLX memory limit and one without a limit,
and reads `mx.get_peak_memory()` in each: the first is the step's need (nothing run ahead), what the estimate
(memfit.estimate.mlx_memory's `mlx_peak_bytes`, the total less the process runtime) predicts and is compared with;
the second is what MLX holds when it may run ahead of the ops running (memfit.mlx.measure.run_steps says how). Its
own section in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
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
# Whole models of >= 100M parameters, where the model-dependent part is most of the peak (few cases: each trains
# 135M parameters for 3 steps on 2 cores).
WHOLE = {"smollm2-135m": None}
WHOLE_CASES = [
    dict(method="lora", dtype="fp32", batch_size=2, seq_len=128),
    dict(method="lora", dtype="fp32", batch_size=2, seq_len=256),
    dict(method="lora", dtype="fp32", batch_size=1, seq_len=512, grad_checkpointing=False),
    dict(method="full", dtype="fp32", batch_size=1, seq_len=128),
    dict(method="full", dtype="fp32", batch_size=1, seq_len=128, grad_checkpointing=False),
]
# Published checkpoints are mostly stored in bf16; training in fp32 converts them while loading.
BF16_STORED = {"smollm2-135m": 8, "qwen2.5-0.5b": 4}
BF16_STORED_CASES = [
    dict(method="lora", dtype="fp32", batch_size=4, seq_len=256),
    dict(method="full", dtype="fp32", batch_size=2, seq_len=256),
]


# Mixture of experts: Mixtral and Qwen3-MoE cut to 2 layers and a quarter of their width (experts 8 and 32), big
# enough that the experts, not the process baseline, make most of the peak. Their checkpoints store one tensor per
# expert, as the published ones do, so transformers fuses them while loading.
MOE_CUTS = {
    "mixtral-8x7b": dict(hidden_size=1024, intermediate_size=3584, num_attention_heads=8, num_key_value_heads=2,
                         num_local_experts=8, vocab_size=2048, tie_word_embeddings=False),
    "qwen3-30b-a3b": dict(hidden_size=1024, intermediate_size=3072, moe_intermediate_size=384, num_experts=32,
                          num_attention_heads=16, num_key_value_heads=4, head_dim=64, vocab_size=2048,
                          tie_word_embeddings=False),
}
MOE_CASES = [
    dict(method="lora", dtype="fp32", batch_size=2, seq_len=256),
    dict(method="lora", dtype="fp32", batch_size=2, seq_len=256, lora_targets="q_proj,v_proj,experts"),
    dict(method="qlora", dtype="fp32", batch_size=4, seq_len=512, grad_checkpointing=False),
    dict(method="qlora", dtype="fp32", batch_size=2, seq_len=256),
    dict(method="full", dtype="fp32", batch_size=2, seq_len=256),
]


def run(device: str, quick: bool, moe: bool = False, on_row=None) -> list[dict]:
    """Every case's row; `on_row(rows, total)` after each, so a long run leaves what it measured if stopped."""
    from transformers import AutoConfig

    from memfit.config import TrainConfig
    from memfit.estimate.measure import measure_in_child
    from memfit.estimate.memory import Hardware, estimate_memory
    from memfit.models import init_model

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        # The whole model first: the cases the published target is about.
        builds = [(preset, layers, "fp32", WHOLE_CASES[:1] if quick else WHOLE_CASES, None)
                  for preset, layers in WHOLE.items()]
        builds += [(preset, layers, "fp32", CASES[:3] if quick else CASES, None)
                   for preset, layers in ARCHITECTURES.items()]
        builds += [(preset, layers, "bf16", BF16_STORED_CASES, None)
                   for preset, layers in BF16_STORED.items() if not quick]
        if moe:
            builds = [(preset, 2, "fp32", MOE_CASES, overrides) for preset, overrides in MOE_CUTS.items()]
        total = sum(len(cases) for *_, cases, _ in builds)
        for preset, layers, stored, cases, overrides in builds:
            model_dir = Path(scratch) / f"{preset}-{layers or 'all'}-{stored}"
            init_model(preset, model_dir, dtype=stored, num_layers=layers, overrides=overrides)
            hf_config = AutoConfig.from_pretrained(model_dir)
            for case in cases:
                config = TrainConfig(**case)
                estimate = estimate_memory(hf_config, config, Hardware(device, 1 << 40))
                # CUDA: max_memory_reserved is the counter measured (no context in it).
                predicted = estimate.reserved_peak_bytes if device == "cuda" else estimate.process_bytes
                baseline = 0 if device == "cuda" else estimate.baseline_bytes
                started = time.time()
                measured = measure_in_child(model_dir, case, steps=3, device=device)
                peak = measured["max_memory_reserved_bytes"] if device == "cuda" else measured["peak_rss_bytes"]
                in_load = device != "cuda" and measured["load_peak_rss_bytes"] >= measured["peak_rss_bytes"]
                shape = ", ".join(([f"{layers} layers"] if layers else [f"{estimate.params / 1e6:.0f}M params"]) + (["bf16 file"] if stored != "fp32" else [])
                                  + ([f"hidden {overrides['hidden_size']}, {hf_config.num_local_experts if preset.startswith('mixtral') else hf_config.num_experts} experts"] if overrides else []))
                rows.append(dict(model=preset + (f" ({shape})" if shape else ""), case=case, params=estimate.params,
                                 estimate=predicted, measured=peak, error=(predicted - peak) / peak * 100,
                                 baseline=baseline, model_error=(predicted - peak) / (peak - baseline) * 100,
                                 phase="load" if in_load else "step",
                                 seconds=time.time() - started))
                print(f"{rows[-1]['model']:28s} {case} est {predicted / MB:7.0f} MB  measured {peak / MB:7.0f} MB "
                      f" error {rows[-1]['error']:+5.1f}%  model part {rows[-1]['model_error']:+5.1f}%", flush=True)
                if on_row is not None:
                    on_row(rows, total)
    return rows


# MLX: tiny at its 4 layers and smollm2-135m at its whole depth (30 layers): LoRA in fp32 and bf16, MLX's 4-bit
# QLoRA, checkpointing on and off, with the trainer's default chunked loss and (two tiny cases, one smollm2 case)
# the full-logits one (`--no-chunked-loss`): the estimate follows the loss the trainer runs
# (memfit.estimate.mlx_memory.chunked_loss). Neither shape is among the ones benchmarks/derive_mlx_constants.py
# fitted the activation coefficients on.
MLX_MODELS = {"tiny": None, "smollm2-135m": None}
_TINY = [  # 1,024 tokens: 16 chunks of 64 (memfit.train.chunk_size.mlx_chunk_tokens: Liger's rule on this vocabulary)
    dict(method="lora", dtype="fp32", batch_size=4, seq_len=256, grad_checkpointing=False),
    dict(method="lora", dtype="fp32", batch_size=4, seq_len=256, grad_checkpointing=True),
    dict(method="lora", dtype="bf16", batch_size=8, seq_len=128, grad_checkpointing=False),
    dict(method="lora", dtype="bf16", batch_size=1, seq_len=1024, grad_checkpointing=True),
    dict(method="lora", quant="4", dtype="bf16", batch_size=4, seq_len=256, grad_checkpointing=False),
    dict(method="lora", quant="4", dtype="fp32", batch_size=8, seq_len=128, grad_checkpointing=True),
]
MLX_CASES = {
    "tiny": [dict(case, chunked_loss=True) for case in _TINY]
            + [dict(case, chunked_loss=False) for case in (
                dict(method="lora", dtype="fp32", batch_size=2, seq_len=256, grad_checkpointing=False),
                dict(method="lora", dtype="bf16", batch_size=1, seq_len=512, grad_checkpointing=True))]
            # Batches of the size a probe tries: the README's probe with --max-memory 2 --seq-len 256 first tried
            # 95 x 256 with the defaults (fp32 on a CPU, checkpointing, the chunked loss); and 32 x 512 bf16
            # without checkpointing, -11.2% (by hand) and -12.5% (here) when the coefficients' fit had no run above
            # 2,048 tokens.
            + [dict(method="lora", dtype="fp32", batch_size=95, seq_len=256, grad_checkpointing=True,
                    chunked_loss=True),
               dict(method="lora", dtype="bf16", batch_size=32, seq_len=512, grad_checkpointing=False,
                    chunked_loss=True)]
            # Adapters on some linears or in the last layers, and a full fine-tune (every other case adapts every
            # linear of every layer, as the coefficients' runs do): memfit.estimate.mlx_memory.layer_saves.
            + [dict(method="lora", dtype="fp32", batch_size=8, seq_len=128, grad_checkpointing=False,
                    chunked_loss=False, lora_targets="q_proj,v_proj"),
               dict(method="lora", dtype="bf16", batch_size=4, seq_len=256, grad_checkpointing=False,
                    chunked_loss=True, lora_targets="down_proj", lora_layers=2),
               dict(method="full", dtype="fp32", batch_size=4, seq_len=256, grad_checkpointing=False,
                    chunked_loss=True)],
    "smollm2-135m": [
        dict(method="lora", dtype="bf16", batch_size=1, seq_len=256, grad_checkpointing=True, chunked_loss=True),
        dict(method="lora", dtype="fp32", batch_size=2, seq_len=128, grad_checkpointing=False, chunked_loss=True),
        dict(method="lora", dtype="bf16", batch_size=1, seq_len=256, grad_checkpointing=True, chunked_loss=False),
        # 4-bit: quantized matmuls are slow on MLX's CPU build (one of 512 x 576 by 1536 x 576, 4-bit: 2.6 s, in
        # bf16 0.13 s, timed by hand), so 2 x 256 ran past 1,800 s on one core; 1 x 64 is the real model's
        # quantized layout at a few minutes.
        dict(method="lora", quant="4", dtype="bf16", batch_size=1, seq_len=64, grad_checkpointing=False,
             chunked_loss=True),
        # The seeds' --lora-layers 16 (../shared/seeds/001): adapters in the last 16 of the 30 layers.
        dict(method="lora", dtype="bf16", batch_size=1, seq_len=256, grad_checkpointing=False, chunked_loss=True,
             lora_layers=16),
    ],
}


def _method_label(case: dict) -> str:
    """The method, with the adapters where they are not every linear of every layer."""
    where = [case["lora_targets"]] if case.get("lora_targets", "all-linear") != "all-linear" else []
    layers = case.get("lora_layers")
    where += [f"last {layers} layers" if layers > 1 else "last layer"] if layers else []
    return case["method"] + (f" ({'; '.join(where)})" if where else "")


def _loss_label(hf_config, case: dict) -> str:
    """The loss the MLX trainer ran: chunked, or the full logits (asked for, or too few tokens to chunk)."""
    from memfit.config import TrainConfig
    from memfit.estimate.mlx_memory import chunked_loss

    if chunked_loss(hf_config, TrainConfig(**case), case["batch_size"] * case["seq_len"]):
        return "chunked"
    return "full logits (too few chunks)" if case["chunked_loss"] else "full logits"


def mlx_selection(only: str | None, quick: bool) -> dict[str, list[dict]]:
    """The cases to run: `--only tiny,smollm2-135m:1` (a preset's first N cases, or all of them), else all (or
    with --quick the first 2 of each). A 30-layer case takes 5-15 minutes on 2 shared cores."""
    if not only:
        return {preset: cases[:2] if quick else cases for preset, cases in MLX_CASES.items()}
    chosen = {}
    for item in only.split(","):
        preset, _, count = item.partition(":")
        chosen[preset] = MLX_CASES[preset][:int(count)] if count else MLX_CASES[preset]
    return chosen


def run_mlx(selection: dict[str, list[dict]], timed_out: list[str], timeout_s: float = 900) -> list[dict]:
    """The MLX cases' rows; a case whose child runs past measure_in_child's timeout goes into `timed_out` and the
    run goes on (4-bit smollm2-135m at 2 x 256 took over 900 s on one core: the rows before it were lost)."""
    import subprocess

    from transformers import AutoConfig

    from memfit.config import TrainConfig
    from memfit.estimate.memory import Hardware
    from memfit.estimate.mlx_memory import estimate_mlx
    from memfit.mlx.measure import measure_in_child
    from memfit.models import init_model

    one_thread = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for preset, cases in selection.items():
            model_dir = Path(scratch) / preset
            init_model(preset, model_dir, num_layers=MLX_MODELS[preset])
            hf_config = AutoConfig.from_pretrained(model_dir)
            for case in cases:
                estimate = estimate_mlx(hf_config, TrainConfig(**case), Hardware("cpu", 1 << 40))
                started = time.time()
                try:  # the need and the unconstrained peak side by side, one core each
                    with ThreadPoolExecutor(2) as pool:
                        need, free = pool.map(lambda limit, cpu: measure_in_child(
                            model_dir, case, steps=3, timeout_s=timeout_s, env=one_thread,
                            memory_limit_bytes=limit, cpu=cpu), (1, 0), _cores())
                except subprocess.TimeoutExpired as timeout:
                    timed_out.append(f"{preset} {case} (timed out after {timeout.timeout:.0f} s)")
                    print(timed_out[-1], flush=True)
                    continue
                peak = need["peak_bytes"]
                rows.append(dict(model=f"{preset} ({estimate.params / 1e6:.1f}M params, {hf_config.num_hidden_layers} "
                                 "layers)", case=case, params=estimate.params, estimate=estimate.mlx_peak_bytes,
                                 measured=peak, error=(estimate.mlx_peak_bytes - peak) / peak * 100,
                                 unconstrained=free["peak_bytes"], loss=_loss_label(hf_config, case),
                                 phase="load" if need["load_peak_bytes"] >= need["train_peak_bytes"] else "step",
                                 seconds=time.time() - started))
                print(f"{rows[-1]['model']:32s} {case} est {estimate.mlx_peak_bytes / MB:7.1f} MB  need "
                      f"{peak / MB:7.1f} MB  error {rows[-1]['error']:+5.1f}%  no limit {free['peak_bytes'] / MB:7.1f} "
                      "MB", flush=True)
    return rows


def _cores() -> tuple[int | None, int | None]:
    """Each child's own core: unpinned, the need's child was preempted by the other's threads and read more (tiny,
    bf16, down_proj in the last 2 layers, 4 x 256: 17.4 MiB beside the other child, 16.5 MiB in each of three runs
    alone on a core)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return (cores[0], cores[1]) if len(cores) >= 2 else (None, None)


def markdown_mlx(rows: list[dict], command: str, left_out: list[str]) -> str:
    import mlx.core as mx

    from importlib import metadata

    from memfit.estimate.mlx_memory import constants

    worst = max(abs(row["error"]) for row in rows)
    lines = [
        f"### MLX estimate accuracy ({len(rows)} cases, worst error {worst:.1f}%)",
        "",
        f"Measured with `{command}` on {platform.machine()} "
        f"{platform.system()}, {_cpu_name()}, Python {platform.python_version()}, MLX {mx.__version__} "
        f"({'Metal' if mx.metal.is_available() else 'CPU, mlx[cpu]'}), mlx-lm {metadata.version('mlx-lm')}. Each "
        "case: 3 steps of memfit's MLX trainer (its own load, quantization, adapters, AdamW and compiled step: "
        "memfit.mlx.measure) on random full-length rows in two fresh children at once, each pinned to a core of "
        "its own: need = "
        "`mx.get_peak_memory()` (the arrays' high-water mark) under a 1-byte MLX memory limit, where MLX waits for "
        "the running ops before each allocation, so nothing is run ahead; no limit = the same without a limit, "
        "where MLX allocates up to 10 ops ahead of those running (mlx/transforms.cpp, MAX_ACTIVE_TASKS) and how "
        "much that holds depends on timing; estimate = `memfit estimate --engine mlx`'s `mlx_peak_bytes` (its "
        "total less the process runtime), the need. The activation coefficients come from `python benchmarks/derive_mlx_constants.py` "
        f"(other shapes; its own fit's worst error {constants()['fit']['worst_error_percent']:.1f}%). Loss: the "
        "trainer's default chunked loss, or the full logits (`--no-chunked-loss`, or fewer tokens than "
        "memfit.train.chunk_size.MLX_MIN_CHUNKS chunks, where the trainer runs the plain head).",
        "",
        "| model | method | quant | dtype | batch × seq | grad ckpt | loss | estimate MB | need MB | peak in | "
        "error | no limit MB |",
        "|---|---|---|---|---|---|---|---:|---:|---|---:|---:|",
    ]
    for row in rows:
        case = row["case"]
        lines.append(f"| {row['model']} | {_method_label(case)} | {case.get('quant', 'none')} | {case['dtype']} | "
                     f"{case['batch_size']} × {case['seq_len']} | {'on' if case['grad_checkpointing'] else 'off'} | "
                     f"{row['loss']} | {row['estimate'] / MB:,.1f} | "
                     f"{row['measured'] / MB:,.1f} | {row['phase']} | {row['error']:+.1f}% | "
                     f"{row['unconstrained'] / MB:,.1f} ({(row['unconstrained'] / row['measured'] - 1) * 100:+.0f}%) |")
    if left_out:
        lines += ["", "Not run in this session (2 CPU cores shared with other jobs; a 30-layer case takes 5-15 "
                  "minutes): " + "; ".join(left_out) + "."]
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict], device: str, moe: bool = False, total: int | None = None) -> str:
    import torch

    from memfit.config import TrainConfig
    import transformers

    worst = max(abs(row["error"]) for row in rows)
    worst_model = max(abs(row["model_error"]) for row in rows)
    within = sum(abs(row["error"]) <= 10 for row in rows)
    within_model = sum(abs(row["model_error"]) <= 10 for row in rows)
    big = [row for row in rows if row["params"] >= 100_000_000]
    worst_big = (f"; >= 100M params: worst {max(abs(row['error']) for row in big):.1f}% on the whole, "
                 f"{max(abs(row['model_error']) for row in big):.1f}% on the model-dependent part" if big else "")
    lines = [
        f"### Estimator accuracy on {device}{', mixture of experts' if moe else ''} ({len(rows)} cases; within 10%: "
        f"{within} on the whole peak, {within_model} on the model part; worst {worst:.1f}% whole, "
        f"{worst_model:.1f}% model part{worst_big}"
        f"{f'; stopped after {len(rows)} of {total} cases' if total and len(rows) < total else ''})",
        "",
        f"Measured with `python benchmarks/estimate_accuracy.py --device {device}{' --moe' if moe else ''} --write` on "
        f"{platform.machine()} "
        f"{platform.system()}, {_cpu_name()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}. Each case: 3 training steps (AdamW) in a fresh child process on "
        "random full-length sequences; measured = the child's peak RSS (`VmHWM`; peak in: loading the model or a "
        "training step) "
        "(CUDA: `torch.cuda.max_memory_reserved`); estimate = `memfit estimate` for the same configuration "
        "(CUDA: its `reserved_peak_bytes`). Baseline = the estimate's process baseline (CPU: the constants "
        "`benchmarks/derive_constants.py` measured, plus this machine's library pages); model part error = "
        "(estimate − measured) / (measured − baseline), the same absolute error over the model-dependent part.",
        "",
        "| model | method | dtype | batch × seq | grad ckpt | extra | estimate MB | measured MB | baseline MB | "
        "peak in | error | model part error |",
        "|---|---|---|---|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for row in rows:
        case = row["case"]
        extra = " ".join(f"{key}={case[key]}" for key in ("lora_layers", "chunked_loss", "lora_targets") if key in case)
        lines.append(f"| {row['model']} | {case['method']} | {case['dtype']} | {case['batch_size']} × "
                     f"{case['seq_len']} | {'on' if TrainConfig(**case).grad_checkpointing else 'off'} | {extra} | "
                     f"{row['estimate'] / MB:,.0f} | {row['measured'] / MB:,.0f} | {row['baseline'] / MB:,.0f} | "
                     f"{row['phase']} | {row['error']:+.1f}% | {row['model_error']:+.1f}% |")
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


DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def publish(table: str, marker: str, write: bool, out: Path = DOCS) -> None:
    """A benchmark's last step: print its table, or with --write put it in `out`'s section `marker`."""
    if not write:
        print(table)
        return
    write_section(Path(out), marker, table)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="3 cases per architecture")
    parser.add_argument("--moe", action="store_true", help="the mixture-of-experts cuts only (their own section)")
    parser.add_argument("--engine", default="torch", choices=("torch", "mlx"),
                        help="mlx: memfit's MLX engine against mx.get_peak_memory() (its own section)")
    parser.add_argument("--only", help="mlx: PRESET[:N],... (a preset's first N cases, or all): e.g. "
                        "tiny,smollm2-135m:1")
    parser.add_argument("--write", action="store_true", help="write the table into --out (else print it)")
    parser.add_argument("--out", default=str(DOCS))
    parser.add_argument("--timeout", type=float, default=900,
                        help="mlx: seconds per measuring child (4-bit smollm2-135m at 2 x 256 runs past 900 on a core)")
    args = parser.parse_args()
    if args.engine == "mlx":
        selection = mlx_selection(args.only, args.quick)
        timed_out: list[str] = []
        rows = run_mlx(selection, timed_out, args.timeout)
        left_out = [f"{preset} {case}" for preset, cases in MLX_CASES.items() for case in cases
                    if case not in selection.get(preset, [])] + timed_out
        command = "python benchmarks/estimate_accuracy.py " + " ".join(sys.argv[1:])
        publish(markdown_mlx(rows, command, left_out), "estimate-accuracy-mlx-cpu", args.write, args.out)
        print(f"worst error {max(abs(r['error']) for r in rows):.1f}%")
        sys.exit(0)
    marker = f"estimate-accuracy-{'moe-' if args.moe else ''}{args.device}"

    def written(rows: list[dict], total: int) -> None:
        write_section(Path(args.out), marker, markdown(rows, args.device, moe=args.moe, total=total))

    rows = run(args.device, args.quick, args.moe, on_row=written if args.write else None)
    publish(markdown(rows, args.device, moe=args.moe), marker, args.write, args.out)
    print(f"worst error {max(abs(r['error']) for r in rows):.1f}%")
    sys.exit(0)


if __name__ == "__main__":
    main()
