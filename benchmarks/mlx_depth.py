"""What an MLX step holds per decoder layer and beside its layers, measured by depth, against the estimate.

    python benchmarks/mlx_depth.py [--shapes b,d,g,k,m] [--jobs 2] [--json] [--write]

benchmarks/derive_mlx_constants.py fits its coefficients on steps of shapes 1-8 layers deep, each at one depth, so
the fit cannot tell what grows with the layers from what does not (the head, and what a step holds beside its
layers); a form can then be right on the fitted runs and wrong on a deeper model or a shallower step. This script
measures each named shape (derive_mlx_constants.SHAPES) at its depth and cut to fewer layers (1, half, all), fp32
1 x 1,024 and bf16 2 x 512, LoRA on every linear, no checkpointing, the full logits: each case's need
(memfit.mlx.measure under a 1-byte MLX memory limit, in a fresh child pinned to a core) less the estimate's exact
part (weights, adapters, gradients, AdamW states) is its activations. Per shape and dtype: a layer's activations
(the least-squares slope over the depths) and what the 1-layer step holds beside its head and its layer (its
activations less the slope and the head's estimated terms), each measured and as `memfit estimate --engine mlx`
counts them.

`--write` puts the table in docs/benchmarks.md between `<!-- mlx-depth -->` markers.
"""

from __future__ import annotations

import argparse
import json
import platform
import queue
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from derive_mlx_constants import SHAPES  # noqa: E402  (the fit's shapes)
from estimate_accuracy import publish  # noqa: E402

MB = 10**6
CASES = [dict(method="lora", dtype="fp32", batch_size=1, seq_len=1024, grad_checkpointing=False, chunked_loss=False),
         dict(method="lora", dtype="bf16", batch_size=2, seq_len=512, grad_checkpointing=False, chunked_loss=False)]


def depths(layers: int) -> list[int]:
    return sorted({1, max(1, layers // 2), layers})


def estimated(hf_config, case: dict) -> dict:
    """The estimate's exact part, its activations (every activation term at its coefficient) and its head's share."""
    from memfit.config import TrainConfig
    from memfit.estimate.memory import Hardware
    from memfit.estimate.mlx_memory import HEAD_TERMS, TERMS, config_terms, constants, estimate_mlx
    from memfit.models.arch import arch_info

    config, hardware = TrainConfig(**case), Hardware("cpu", 1 << 40)
    exact = estimate_mlx(hf_config, config, hardware, coefficients={name: 0.0 for name in TERMS}).mlx_peak_bytes
    total = estimate_mlx(hf_config, config, hardware).mlx_peak_bytes
    terms = config_terms(arch_info(hf_config), config, config.batch_size, 4 if config.dtype == "fp32" else 2, False)
    coefficients = constants()["coefficients"]
    return {"exact": exact, "activations": total - exact,
            "head": sum(coefficients[name] * terms[name] for name in HEAD_TERMS)}


def measure(names: list[str], jobs: int) -> list[dict]:
    """Each shape at its depths (`depths`), both CASES, in a scratch directory of models."""
    from memfit.models import init_model

    with tempfile.TemporaryDirectory(prefix="mlx-depth-") as scratch:
        todo = []
        for name in names:
            values = dict(SHAPES[name])
            full = values.pop("num_hidden_layers")
            for layers in depths(full):
                model_dir = init_model("tiny", Path(scratch) / f"{name}-{layers}", num_layers=layers, overrides=values)
                todo += [(name, layers, model_dir, case) for case in CASES]
        return run_all(todo, jobs)


def run_all(todo: list[tuple], jobs: int) -> list[dict]:
    """Each (shape, layers, model dir, case): `jobs` children at a time, each on a core no other child is on."""
    from transformers import AutoConfig

    from memfit.mlx.measure import measure_in_child

    one_thread = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    free_cores: queue.Queue = queue.Queue()
    for core in range(jobs):
        free_cores.put(core)

    def run(item) -> dict:
        name, layers, model_dir, case = item
        core = free_cores.get()  # a core no other child is on: a preempted child reads a higher need
        try:
            need = measure_in_child(model_dir, case, steps=2, timeout_s=3600, env=one_thread,
                                    memory_limit_bytes=1, cpu=core)["train_peak_bytes"]
        finally:
            free_cores.put(core)
        estimate = estimated(AutoConfig.from_pretrained(model_dir), case)
        row = dict(shape=name, layers=layers, case=case, need=need, activations=need - estimate["exact"],
                   estimate=estimate["activations"], head=estimate["head"])
        print(json.dumps(row), flush=True)
        return row

    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(run, todo))


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of (layers, bytes)."""
    n = len(points)
    mean_x, mean_y = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)


def summary(rows: list[dict]) -> list[dict]:
    """Per shape and dtype: a layer (slope) and what the 1-layer step holds beside its head and its layer."""
    out = []
    for name in dict.fromkeys(row["shape"] for row in rows):
        for case in CASES:
            mine = [row for row in rows if row["shape"] == name and row["case"] == case]
            if len({row["layers"] for row in mine}) < 2:
                continue
            one = next(row for row in mine if row["layers"] == 1)
            measured = slope([(row["layers"], row["activations"]) for row in mine])
            counted = slope([(row["layers"], row["estimate"]) for row in mine])
            out.append(dict(shape=name, dtype=case["dtype"], tokens=case["batch_size"] * case["seq_len"],
                            depths=sorted(row["layers"] for row in mine), layer=measured, layer_estimate=counted,
                            beside=one["activations"] - measured - one["head"],
                            beside_estimate=one["estimate"] - counted - one["head"]))
    return out


def markdown(rows: list[dict], command: str) -> str:
    lines = [
        "### What an MLX step holds per layer and beside its layers, by depth",
        "",
        f"Measured with `{command}` on {platform.machine()} {platform.system()}, MLX {version('mlx')} (CPU), "
        f"{time.strftime('%Y-%m-%d')}. Each shape of "
        "benchmarks/derive_mlx_constants.py at the depths listed (the same widths, cut), LoRA on every linear, no "
        "checkpointing, the full logits; each case's need (a 1-byte MLX memory limit, a fresh child pinned to a "
        "core) less the estimate's exact part. Per layer: the least-squares slope over the depths. Beside: the "
        "1-layer step's activations less a layer and less the head's estimated terms (what the estimate's "
        "`hidden_backward` and fixed part stand for). 10^6 bytes.",
        "",
        "| shape | dtype | tokens | depths | per layer MB | estimate | error | beside MB | estimate |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in summary(rows):
        error = (row["layer_estimate"] - row["layer"]) / row["layer"] * 100
        lines.append(f"| {row['shape']} | {row['dtype']} | {row['tokens']:,} | {', '.join(map(str, row['depths']))} "
                     f"| {row['layer'] / MB:.2f} | {row['layer_estimate'] / MB:.2f} | {error:+.1f}% "
                     f"| {row['beside'] / MB:.2f} | {row['beside_estimate'] / MB:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="b,d,g,k,m", help="comma-separated names of derive_mlx_constants.SHAPES")
    parser.add_argument("--jobs", type=int, default=2, help="children at a time, each pinned to a core of its own")
    parser.add_argument("--json", action="store_true", help="print the rows only")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    names = [name.strip() for name in args.shapes.split(",") if name.strip()]
    unknown = [name for name in names if name not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(unknown)}: one of {', '.join(SHAPES)}")
    rows = measure(names, args.jobs)
    if args.json:
        return
    command = "python benchmarks/mlx_depth.py" + (f" --shapes {args.shapes}" if args.shapes != "b,d,g,k,m" else "")
    publish(markdown(rows, command + " --write"), "mlx-depth", args.write)


if __name__ == "__main__":
    main()
