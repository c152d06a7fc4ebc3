"""Derive the MLX estimate's activation coefficients and runtime on this machine, and write them where the
estimator reads them (src/memfit/estimate/mlx_constants.json).

    python benchmarks/derive_mlx_constants.py [--out src/memfit/estimate/mlx_constants.json] [--dry-run]

memfit.estimate.mlx_memory writes an MLX step's arrays as exact terms (weights in MLX's layout, fp32 adapters, their
gradients and AdamW states) plus activation terms whose sizes follow from the graph (the head's fp32 logits; per
layer the h-wide values, the MLP's i-wide values and the attention scores, with and without checkpointing:
`term_bytes`). How many copies of each the compiled step holds at its highest point is what this script
measures: real MLX training steps (memfit.mlx.measure: the trainer's own load, quantization, adapters, optimizer
and compiled step) on small llamas of four shapes that differ in width, MLP width, heads, vocabulary and depth
(none of them the shapes benchmarks/estimate_accuracy.py checks the estimate on), each at several batch x sequence
sizes, with and without gradient checkpointing, in fp32 and bf16, with the full-logits loss and the chunked one
(memfit.mlx.loss). The coefficients are fitted on the full-logits runs; the
chunked runs are reported beside them (`chunked_errors_percent`), since the estimate counts the full logits. For each run: arrays above the exact terms =
`mx.get_peak_memory()` - (weights + adapters + gradients + optimizer), and the coefficients are the non-negative
least-squares fit of those bytes on the terms, each run weighted by 1/its bytes (relative error). The runtime is the
median over the runs of the child's peak RSS less MLX's peak (on a Linux CPU, MLX's arrays are inside the RSS).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "memfit" / "estimate" / "mlx_constants.json"

# Small llamas (memfit init-model's tiny preset with these config values): widths a multiple of 64 (MLX's group).
SHAPES = {
    "a": dict(hidden_size=64, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1, vocab_size=1024,
              num_hidden_layers=1),
    "b": dict(hidden_size=192, intermediate_size=512, num_attention_heads=6, num_key_value_heads=2,
              vocab_size=4096, num_hidden_layers=3),
    "c": dict(hidden_size=64, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=4096, num_hidden_layers=2),
    "d": dict(hidden_size=192, intermediate_size=256, num_attention_heads=3, num_key_value_heads=1,
              vocab_size=1024, num_hidden_layers=3),
}
# (batch, seq, checkpointing, dtype) per shape: each sequence length with checkpointing on and off, in fp32 and
# bf16 (the dtypes swapped between shapes, so each term is seen in both).
_FIRST = [(1, 512, False, "fp32"), (4, 128, False, "bf16"), (2, 256, False, "bf16"),
          (1, 512, True, "bf16"), (4, 128, True, "fp32"), (2, 256, True, "fp32")]
_SWAPPED = [(batch, seq, checkpointing, "bf16" if dtype == "fp32" else "fp32")
            for batch, seq, checkpointing, dtype in _FIRST]
RUNS = {"a": _FIRST, "b": _SWAPPED, "c": _FIRST, "d": _SWAPPED}


def measure(scratch: Path) -> list[dict]:
    from transformers import AutoConfig

    from memfit.config import TrainConfig
    from memfit.estimate.memory import Hardware
    from memfit.estimate.mlx_memory import TERMS, Shape, estimate_mlx, term_bytes
    from memfit.mlx.measure import measure_in_child
    from memfit.models import init_model
    from memfit.models.arch import arch_info

    rows = []
    for name, shape in SHAPES.items():
        values = dict(shape)
        layers = values.pop("num_hidden_layers")
        model_dir = scratch / name
        init_model("tiny", model_dir, num_layers=layers, overrides=values)
        hf_config = AutoConfig.from_pretrained(model_dir)
        for (batch, seq, checkpointing, dtype), chunked in itertools.product(RUNS[name], (False, True)):
            case = dict(method="lora", dtype=dtype, batch_size=batch, seq_len=seq, grad_checkpointing=checkpointing,
                        chunked_loss=chunked)
            config = TrainConfig(**case)
            estimate = estimate_mlx(hf_config, config, Hardware("cpu", 1 << 40), model_name=name,
                                    coefficients={term: 0.0 for term in TERMS})
            exact = sum(estimate.breakdown[key] for key in ("weights", "adapters", "gradients", "optimizer"))
            terms = term_bytes(Shape.of(arch_info(hf_config)), batch, seq, checkpointing, 4 if dtype == "fp32" else 2)
            measured = measure_in_child(model_dir, case, steps=2)
            rows.append(dict(shape=name, case=case, exact=exact, terms=terms, peak=measured["peak_bytes"],
                             peak_rss=measured["peak_rss_bytes"]))
            print(f"{name} {case}: peak {measured['peak_bytes'] / 2**20:.1f} MB, exact part "
                  f"{exact / 2**20:.1f} MB", flush=True)
    return rows


def recorded_rows(path: Path) -> list[dict]:
    """The runs a previous measurement wrote into mlx_constants.json, with their terms computed again from the
    shapes (transformers' LlamaConfig from the recorded config values: no model is written or trained)."""
    from transformers import LlamaConfig

    from memfit.config import TrainConfig
    from memfit.estimate.memory import Hardware
    from memfit.estimate.mlx_memory import TERMS, Shape, estimate_mlx, term_bytes
    from memfit.models.arch import arch_info
    from memfit.models.registry import get_architecture

    recorded = json.loads(path.read_text())
    rows = []
    for run in recorded["runs"]:
        values = dict(recorded["shapes"][run["shape"]])
        base = get_architecture("tiny").to_hf_config()
        base_values = {key: value for key, value in base.to_dict().items() if key != "head_dim"}  # from the heads
        hf_config = LlamaConfig(**{**base_values, **values})
        case = {key: run[key] for key in ("method", "dtype", "batch_size", "seq_len", "grad_checkpointing")}
        case["chunked_loss"] = run.get("chunked_loss", False)  # runs recorded before the MLX chunked loss: full logits
        exact_estimate = estimate_mlx(hf_config, TrainConfig(**case), Hardware("cpu", 1 << 40),
                                      coefficients={term: 0.0 for term in TERMS})
        exact = sum(exact_estimate.breakdown[key] for key in ("weights", "adapters", "gradients", "optimizer"))
        assert exact == run["exact_bytes"], (run, exact)  # the shapes rebuilt are the ones measured
        terms = term_bytes(Shape.of(arch_info(hf_config)), case["batch_size"], case["seq_len"],
                           case["grad_checkpointing"], 4 if case["dtype"] == "fp32" else 2)
        rows.append(dict(shape=run["shape"], case=case, exact=exact, terms=terms, peak=run["peak_bytes"],
                         peak_rss=run["peak_rss_bytes"]))
    return rows


def fit(rows: list[dict]) -> tuple[dict[str, float], list[float]]:
    """Non-negative least squares (projected: terms whose coefficient comes out negative are dropped and the fit
    rerun), rows weighted by 1/their bytes."""
    import numpy as np

    from memfit.estimate.mlx_memory import TERMS

    y = np.array([row["peak"] - row["exact"] for row in rows], dtype=float)
    x = np.array([[row["terms"][name] for name in TERMS] for row in rows], dtype=float)
    weights = 1.0 / y
    active = [i for i in range(len(TERMS)) if x[:, i].any()]
    while True:
        solution, *_ = np.linalg.lstsq(x[:, active] * weights[:, None], y * weights, rcond=None)
        if (solution >= 0).all():
            break
        active = [index for index, value in zip(active, solution) if value >= 0]
    coefficients = {name: 0.0 for name in TERMS}
    for index, value in zip(active, solution):
        coefficients[TERMS[index]] = round(float(value), 4)
    predicted = x @ np.array([coefficients[name] for name in TERMS])
    errors = [float((p + row["exact"] - row["peak"]) / row["peak"] * 100) for p, row in zip(predicted, rows)]
    return coefficients, errors


def _errors(coefficients: dict[str, float], rows: list[dict]) -> list[float]:
    """(estimate - measured) / measured in % for `rows`, with these coefficients."""
    from memfit.estimate.mlx_memory import TERMS

    return [float((sum(coefficients[name] * row["terms"][name] for name in TERMS) + row["exact"] - row["peak"])
                  / row["peak"] * 100) for row in rows]


def recorded_on(args) -> str | None:
    """--refit keeps where and when the runs were measured."""
    if not args.refit:
        return None
    return json.loads(Path(args.out).read_text())["measured_on"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--dry-run", action="store_true", help="print, write nothing")
    parser.add_argument("--refit", action="store_true",
                        help="measure nothing: fit again on the runs --out recorded (after a change of the terms)")
    args = parser.parse_args()
    import mlx.core as mx

    started = time.time()
    if args.refit:
        rows = recorded_rows(Path(args.out))
    else:
        with tempfile.TemporaryDirectory() as scratch:
            rows = measure(Path(scratch))
    full = [row for row in rows if not row["case"].get("chunked_loss")]
    coefficients, errors = fit(full)
    validation = _errors(coefficients, [row for row in rows if row["case"].get("chunked_loss")])
    runtime = int(statistics.median(row["peak_rss"] - row["peak"] for row in rows))
    from importlib import metadata

    result = {
        "coefficients": coefficients,
        "runtime_bytes": runtime,
        "fit": {"runs": len(full), "worst_error_percent": round(max(abs(e) for e in errors), 2),
                "errors_percent": [round(e, 2) for e in errors],
                "chunked_runs": len(validation),
                "chunked_errors_percent": [round(e, 2) for e in validation]},
        "measured_on": recorded_on(args) or f"{platform.machine()} {platform.system()}, MLX {mx.__version__} "
                       f"({'Metal' if mx.metal.is_available() else 'CPU'}), mlx-lm {metadata.version('mlx-lm')}, "
                       f"{time.strftime('%Y-%m-%d')}",
        "command": "python benchmarks/derive_mlx_constants.py" + (" --refit" if args.refit else ""),
        "shapes": SHAPES,
        "runs": [dict(shape=row["shape"], **row["case"], peak_bytes=row["peak"], exact_bytes=row["exact"],
                      peak_rss_bytes=row["peak_rss"]) for row in rows],
        "seconds": round(time.time() - started),
    }
    print(json.dumps({key: result[key] for key in ("coefficients", "runtime_bytes", "fit")}, indent=1))
    if not args.dry_run:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    sys.exit(0)


if __name__ == "__main__":
    main()
