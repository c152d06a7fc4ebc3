"""Derive the MLX estimate's activation coefficients and runtime on this machine, and write them where the
estimator reads them (src/memfit/estimate/mlx_constants.json).

    python benchmarks/derive_mlx_constants.py [--out src/memfit/estimate/mlx_constants.json] [--dry-run]
        [--need] [--jobs N] [--refit | --shapes g | --missing | --chunked/--checkpointed [--shapes g]]

The shipped constants: `--need --jobs 2` (every run under a 1-byte MLX memory limit, so each peak is the step's
need: memfit.mlx.measure.run_steps; memfit.estimate.mlx_memory says why the estimate predicts it), then `--refit`.
The counts in memfit.estimate.mlx_memory.FIXED are not fitted: their terms' bytes are taken off before the fit.

memfit.estimate.mlx_memory writes an MLX step's arrays as exact terms (weights in MLX's layout, fp32 adapters, their
gradients and AdamW states) plus activation terms whose sizes follow from the graph (the head's fp32 logits, or with
the chunked loss two chunks' and the rest; per layer the h-wide values, the MLP's i-wide values and the attention
scores, with and without checkpointing: `term_bytes`; with checkpointing the peak is at the head or at a layer's
recomputation, whichever is larger: `peak_parts`). How many copies of each the compiled step holds at its
highest point is what this script measures: real MLX training steps (memfit.mlx.measure: the trainer's own load,
quantization, adapters, optimizer and compiled step) on small llamas of seven shapes that differ in width, MLP width,
heads, vocabulary (1k-32k, so the head terms range from a small share of the step to most of it) and depth (1-8
layers; none of them the shapes benchmarks/estimate_accuracy.py checks the estimate on; an eighth, 24 layers deep, is
measured and held out of the fit: HELD_OUT), each at 128 to 2,048
tokens and at 16,384 (the batches a probe tries), with and without gradient checkpointing, in fp32 and bf16, with
the full-logits loss and the chunked one (memfit.mlx.loss). Both losses are fitted together: they share every
term but the head's. For each run: arrays above the exact terms = `mx.get_peak_memory()` - (weights + adapters +
gradients + optimizer), and the coefficients are the non-negative least-squares fit of those bytes on the terms
(`fit`), each run weighted by 1/its bytes (relative error); the worst error is reported for all runs and for each
loss apart. The runtime is the median over the runs of the child's peak RSS less MLX's peak (on a Linux CPU, MLX's
arrays are inside the RSS).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "memfit" / "estimate" / "mlx_constants.json"

# Small llamas (memfit init-model's tiny preset with these config values): widths a multiple of 64 (MLX's group).
# Two layer-heavy shapes with small vocabularies (b, d), two head-heavy ones (e: 16k, f: 32k) whose logits
# dominate the step, so the head's terms are not confounded with the fixed part, and the chunked loss really cuts
# the logits (mlx_chunk_tokens is 32-256 there, against 512-1024 tokens), a deep narrow one (g: 8 layers), so the
# terms that grow with the depth are told from those of the one layer checkpointing recomputes at a time, and two
# in the proportions of released models (h, k: MLP 3-3.5x the width, 64-wide heads, vocabulary 32x the width), added
# when the held-out tiny model's checkpointed chunked cases came out 14-17% over with the first five alone.
SHAPES = {
    "b": dict(hidden_size=192, intermediate_size=512, num_attention_heads=6, num_key_value_heads=2,
              vocab_size=4096, num_hidden_layers=3),
    "d": dict(hidden_size=192, intermediate_size=256, num_attention_heads=3, num_key_value_heads=1,
              vocab_size=1024, num_hidden_layers=3),
    "e": dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1,
              vocab_size=16384, num_hidden_layers=2),
    "f": dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
              vocab_size=32768, num_hidden_layers=1),
    "g": dict(hidden_size=64, intermediate_size=192, num_attention_heads=2, num_key_value_heads=1,
              vocab_size=2048, num_hidden_layers=8),
    "h": dict(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=8192, num_hidden_layers=2),
    "k": dict(hidden_size=128, intermediate_size=448, num_attention_heads=2, num_key_value_heads=1,
              vocab_size=4096, num_hidden_layers=4),
    "m": dict(hidden_size=128, intermediate_size=384, num_attention_heads=2, num_key_value_heads=1,
              vocab_size=4096, num_hidden_layers=24),
}
# Measured with the others, never fitted: a deep narrow model in released models' proportions (MLP 3x, vocabulary
# 32x the width) at 24 layers, where the fit's shapes have 1-8. Its runs check the fitted form at a depth the fit
# lacks (`held_out` in mlx_constants.json). With gradient clipping inside the update's graph (the trainer until
# 2026-12-05) the step kept much of every layer's backward alive (benchmarks/mlx_step_phases.py): its 64 x 256
# checkpointed chunked run peaked 1.8x the estimate (-45.8%). With the gradients evaluated first (every run measured
# again) the worst was -20.8%, the fitted shapes' own worst -28.4%; with the 32-token loss chunks (the chunked runs
# measured again, 2026-12-05) its runs are -4.4% to +24.2%, the fitted shapes' worst -18.1%.
HELD_OUT = ("m",)
# (batch, seq, checkpointing, dtype) per shape, each with the full-logits loss and the chunked one: 128, 512 and
# 1024 tokens (the head terms scale with the tokens, the fixed part does not; the attention scores with s^2 at
# sequences of 128-1024), checkpointing on and off, fp32 and bf16 (the dtypes swapped between shapes, so each term
# is seen in both).
_FIRST = [(1, 128, False, "fp32"), (4, 128, True, "bf16"), (2, 512, False, "bf16"),
          (1, 1024, True, "fp32"), (1, 1024, False, "fp32"), (2, 256, True, "bf16")]
_SWAPPED = [(batch, seq, checkpointing, "bf16" if dtype == "fp32" else "fp32")
            for batch, seq, checkpointing, dtype in _FIRST]
RUNS = {"b": _FIRST, "d": _SWAPPED, "e": _FIRST, "f": _SWAPPED, "g": _FIRST, "h": _SWAPPED, "k": _FIRST,
        "m": _SWAPPED}
# The chunked loss only: at 2 x 1024 tokens, twice the chunks of the runs above (they were added when the chunks were
# 256 tokens, four at 1 x 1024, and the first chunk's terms and the others' were proportional: the fit could not
# tell them apart; shape f at eight chunks held 507 MB without checkpointing (466 at four) and 490 with (299 at
# four)). Since the 32-token floor (memfit.train.chunk_size.MLX_MIN_CHUNK_TOKENS, 2026-12-05) they are 64 chunks of
# 32 on shape f, 16 of 128 on b: `--chunked` measured every chunked run again. At 4 x 256,
# four chunks of one row each: without checkpointing the chunks saved more there than at 1 x 1024 (the tiny model:
# 18.8 MB against the full logits at 4 x 256, 10.4 MB at 1 x 1024), which the runs above had only at 1 x 1024.
CHUNKED_ONLY = [(2, 1024, True), (2, 1024, False), (4, 256, False)]
# Batches of the size a probe tries (16,384 tokens; the tiny model's first trial at --max-memory 2 was 95 x 256),
# both losses, without checkpointing in the shape's second dtype and with it in its first: fitted on the runs
# above alone (at most 2,048 tokens), the estimate was -11.2% on the tiny model at 32 x 512 bf16 without
# checkpointing and -7.4% at 48 x 256 fp32 (full logits), measured by hand with memfit.mlx.measure.
LARGE = [(32, 512, False), (64, 256, True)]


def cases(name: str) -> list[dict]:
    """The runs of one shape: RUNS with both losses, CHUNKED_ONLY and LARGE."""
    first = RUNS[name][0][3]
    second = "bf16" if first == "fp32" else "fp32"
    chosen = [*itertools.product(RUNS[name], (False, True)),
              *(((batch, seq, checkpointing, first), True) for batch, seq, checkpointing in CHUNKED_ONLY),
              *itertools.product([(batch, seq, checkpointing, first if checkpointing else second)
                                  for batch, seq, checkpointing in LARGE], (False, True))]
    return [dict(method="lora", dtype=dtype, batch_size=batch, seq_len=seq, grad_checkpointing=checkpointing,
                 chunked_loss=chunked) for (batch, seq, checkpointing, dtype), chunked in chosen]


def exact_and_terms(hf_config, case: dict) -> tuple[int, dict[str, float], int]:
    """A run's exact part (weights + adapters + gradients + optimizer, the estimate with every coefficient 0), its
    activation terms before their coefficients, for the loss the trainer runs, and its gradients' bytes (which
    memfit.estimate.mlx_memory.step_peak counts only where they are live)."""
    from memfit.config import TrainConfig
    from memfit.estimate.memory import Hardware
    from memfit.estimate.mlx_memory import TERMS, chunked_loss, config_terms, estimate_mlx
    from memfit.models.arch import arch_info

    config = TrainConfig(**case)
    estimate = estimate_mlx(hf_config, config, Hardware("cpu", 1 << 40), coefficients={term: 0.0 for term in TERMS})
    exact = sum(estimate.breakdown[key] for key in ("weights", "adapters", "gradients", "optimizer"))
    terms = config_terms(arch_info(hf_config), config, config.batch_size, 4 if config.dtype == "fp32" else 2,
                         chunked_loss(hf_config, config, config.batch_size * config.seq_len))
    return exact, terms, estimate.breakdown["gradients"]


def obsolete(hf_config, case: dict) -> bool:
    """A chunked-loss run with fewer chunks than memfit.train.chunk_size.MLX_MIN_CHUNKS: the trainer takes the plain
    head there now (the full-logits run of the same case measures that), so what such a run measured, before that
    rule, is left out of the fit."""
    from memfit.config import TrainConfig
    from memfit.estimate.mlx_memory import chunked_loss

    tokens = case["batch_size"] * case["seq_len"]
    return case["chunked_loss"] and not chunked_loss(hf_config, TrainConfig(**case), tokens)


def measure(scratch: Path, names: list[str], done: list[dict] = (), memory_limit_bytes: int = 0,
            jobs: int = 1) -> list[dict]:
    """Each named shape's runs (`cases`), but those in `done` (rows recorded before: --missing); `jobs` children at a
    time, each on one thread (the peak is a count of bytes, not of time); `memory_limit_bytes`: MLX's memory limit
    in each child (memfit.mlx.measure.run_steps; 1 measures the step's need: --need)."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoConfig

    from memfit.mlx.measure import measure_in_child
    from memfit.models import init_model

    todo = []
    for name in names:
        cases_left = [case for case in cases(name)
                      if not any(row["shape"] == name and row["case"] == case for row in done)]
        if not cases_left:
            continue
        shape = SHAPES[name]
        values = dict(shape)
        layers = values.pop("num_hidden_layers")
        model_dir = scratch / name
        init_model("tiny", model_dir, num_layers=layers, overrides=values)
        hf_config = AutoConfig.from_pretrained(model_dir)
        todo += [(name, model_dir, hf_config, case) for case in cases_left if not obsolete(hf_config, case)]
    one_thread = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def run(item) -> dict:
        name, model_dir, hf_config, case = item
        exact, terms, gradients = exact_and_terms(hf_config, case)
        measured = measure_in_child(model_dir, case, steps=2, timeout_s=3600, env=one_thread if jobs > 1 else None,
                                    memory_limit_bytes=memory_limit_bytes)
        print(f"{name} {case}: peak {measured['peak_bytes'] / 2**20:.1f} MB, exact part "
              f"{exact / 2**20:.1f} MB", flush=True)
        return dict(shape=name, case=case, exact=exact, terms=terms, gradients=gradients,
                    peak=measured["peak_bytes"], peak_rss=measured["peak_rss_bytes"])

    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(run, todo))


def recorded_rows(path: Path) -> list[dict]:
    """The runs a previous measurement wrote into mlx_constants.json, with their terms computed again from the
    shapes (transformers' LlamaConfig from the recorded config values: no model is written or trained)."""
    from transformers import LlamaConfig

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
        if obsolete(hf_config, case):
            continue
        exact, terms, gradients = exact_and_terms(hf_config, case)
        assert exact == run["exact_bytes"], (run, exact)  # the shapes rebuilt are the ones measured
        rows.append(dict(shape=run["shape"], case=case, exact=exact, terms=terms, gradients=gradients,
                         peak=run["peak_bytes"], peak_rss=run["peak_rss_bytes"]))
    return rows


def fitted_rows(rows: list[dict]) -> list[dict]:
    """The runs the coefficients are fitted on: all but the HELD_OUT shapes'."""
    return [row for row in rows if row["shape"] not in HELD_OUT]


def held_out_rows(rows: list[dict]) -> list[dict]:
    """The runs of the HELD_OUT shapes: measured and recorded, never fitted."""
    return [row for row in rows if row["shape"] in HELD_OUT]


def errors_with(rows: list[dict], coefficients: dict[str, float]) -> list[float]:
    """Each run's estimate error (% of its measured peak) with these coefficients."""
    return [float((predicted_bytes(row, coefficients) - row["peak"]) / row["peak"] * 100) for row in rows]


def predicted_bytes(row: dict, coefficients: dict[str, float]) -> float:
    """A run's estimate: its exact part less the gradients, and what memfit.estimate.mlx_memory.step_peak says is
    live at the peak (every run here trains LoRA adapters, one micro-batch a step)."""
    from memfit.estimate.mlx_memory import step_peak

    activations, logits, gradients, _ = step_peak(row["terms"], coefficients, row["gradients"], True)
    return row["exact"] - row["gradients"] + activations + logits + gradients


def _nnls(x, y, weights):
    """Non-negative least squares (projected: terms whose coefficient comes out negative are dropped and the fit
    rerun), rows weighted by `weights` (1/their activations' bytes: relative error)."""
    import numpy as np

    active = [i for i in range(x.shape[1]) if x[:, i].any()]
    while True:
        solution, *_ = np.linalg.lstsq(x[:, active] * weights[:, None], y * weights, rcond=None)
        if (solution >= 0).all():
            break
        active = [index for index, value in zip(active, solution) if value >= 0]
    coefficients = np.zeros(x.shape[1])
    coefficients[active] = solution
    return coefficients


def fit(rows: list[dict]) -> tuple[dict[str, float], list[float]]:
    """The coefficients of memfit.estimate.mlx_memory.peak_parts' form: a checkpointed run's peak is the larger of
    the head and a layer's recomputation, plus, with the full logits, a share (OVERLAP) of the smaller. For each
    share on a grid of 0.05: start from the additive fit (every term in every run), put each checkpointed run on
    the side those coefficients make larger (a full-logits run's other side's terms scaled by the share), refit,
    and repeat until no run changes side; keep the share whose fit has the least weighted squared error (the
    objective _nnls minimises). The fitted bytes are a run's peak less its exact part without the gradients, and
    less the gradients too on the recomputation's side (memfit.estimate.mlx_memory.step_peak: where the adapters'
    gradients are live)."""
    import numpy as np

    from memfit.estimate.mlx_memory import FIXED, HEAD_TERMS, OVERLAP, RECOMPUTE_TERMS, TERMS

    activations = np.array([row["peak"] - row["exact"] + row["gradients"] for row in rows], dtype=float)
    gradients = np.array([row["gradients"] for row in rows], dtype=float)
    peaks = np.array([row["peak"] for row in rows], dtype=float)
    x = np.array([[row["terms"][name] for name in TERMS] for row in rows], dtype=float)
    weights = 1.0 / activations
    y = activations.copy()
    for name, count in FIXED.items():  # not fitted: taken off the bytes the fitted terms account for
        y = y - count * x[:, TERMS.index(name)]
        x[:, TERMS.index(name)] = 0.0
    head = np.array([name in HEAD_TERMS for name in TERMS])
    recompute = np.array([name in RECOMPUTE_TERMS for name in TERMS])
    checkpointed = x[:, recompute].any(axis=1)
    full_logits = x[:, list(TERMS).index("head")] > 0

    def fit_with(share: float) -> np.ndarray:
        solution = _nnls(x, y, weights)
        sides = None
        for _ in range(30):
            at_head = x[:, head] @ solution[head] >= x[:, recompute] @ solution[recompute]
            if sides is not None and (at_head == sides).all():
                break
            sides = at_head
            other = checkpointed[:, None] & np.where(at_head[:, None], recompute, head)  # the smaller side's terms
            design = x * np.where(other, np.where(full_logits, share, 0.0)[:, None], 1.0)
            solution = _nnls(design, y - gradients * (checkpointed & ~at_head), weights)
        return solution

    def predicted(coefficients: dict[str, float]) -> np.ndarray:
        return np.array([predicted_bytes(row, coefficients) for row in rows])

    best = None
    for share in np.arange(0.0, 1.0001, 0.05):
        coefficients = {name: float(value) for name, value in zip(TERMS, fit_with(float(share)))} | FIXED
        coefficients[OVERLAP] = float(share)
        loss = float((((predicted(coefficients) - peaks) * weights) ** 2).sum())
        if best is None or loss < best[0]:
            best = (loss, coefficients)
    coefficients = {name: round(value, 4) for name, value in best[1].items()}
    return coefficients, errors_with(rows, coefficients)


def recorded(args, key: str):
    """--refit keeps where, when and how long the runs were measured; --missing and --shapes add to them."""
    if not (args.refit or args.missing or args.shapes or args.chunked or args.checkpointed):
        return None
    return json.loads(Path(args.out).read_text()).get(key)


def _added(measured_on: str | None, args) -> str | None:
    """Where and when: the recorded runs', with the day the --missing ones were added."""
    if measured_on and (args.chunked or args.checkpointed):
        kinds = " and ".join(kind for kind, asked in (("chunked-loss", args.chunked),
                                                      ("checkpointed", args.checkpointed)) if asked)
        return f"{measured_on}; {kinds} runs{' of ' + args.shapes if args.shapes else ''} measured again " \
               f"{time.strftime('%Y-%m-%d')}"
    if measured_on and args.missing:
        return f"{measured_on}; runs added {time.strftime('%Y-%m-%d')}"
    if measured_on and args.shapes:
        return f"{measured_on}; shapes {args.shapes} measured {time.strftime('%Y-%m-%d')}"
    return measured_on


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--dry-run", action="store_true", help="print, write nothing")
    parser.add_argument("--shapes", help="measure only these (e.g. g,h: a shape added to SHAPES) and keep the "
                        "other shapes' runs --out recorded")
    parser.add_argument("--refit", action="store_true",
                        help="measure nothing: fit again on the runs --out recorded (after a change of the terms)")
    parser.add_argument("--missing", action="store_true",
                        help="measure only the runs --out has not recorded (after runs were added), keep the rest")
    parser.add_argument("--need", action="store_true",
                        help="measure every run under a 1-byte MLX memory limit: the step's need, nothing run ahead "
                        "(memfit.mlx.measure.run_steps)")
    parser.add_argument("--jobs", type=int, default=1, help="children measured at a time (one thread each)")
    parser.add_argument("--chunked", action="store_true",
                        help="measure the chunked-loss runs again (of --shapes, or all), keep the full-logits ones "
                        "(after a change of the chunked loss)")
    parser.add_argument("--checkpointed", action="store_true",
                        help="measure the checkpointed runs again (of --shapes, or all), keep the others (after a "
                        "change of the checkpoint)")
    args = parser.parse_args()
    import mlx.core as mx

    from memfit.mlx.memory import EVAL_WIDTH, EVAL_WIDTH_VARIABLE  # the children's order (run_steps sets it)

    started = time.time()
    # What the runs' peaks are: a --refit, --missing, --shapes, --chunked or --checkpointed keeps the recorded runs'
    # kind
    need = args.need or recorded(args, "peak") == "need"
    if args.refit:
        rows = recorded_rows(Path(args.out))
    else:
        with tempfile.TemporaryDirectory() as scratch:
            names = args.shapes.split(",") if args.shapes else list(SHAPES)
            again = args.chunked or args.checkpointed
            recorded_before = recorded_rows(Path(args.out)) if args.shapes or args.missing or again else []
            if again:
                kept = [row for row in recorded_before if row["shape"] not in names
                        or not (args.chunked and row["case"]["chunked_loss"]
                                or args.checkpointed and row["case"]["grad_checkpointing"])]
            else:
                kept = [row for row in recorded_before if args.missing or row["shape"] not in names]
            rows = kept + measure(Path(scratch), names, kept if args.missing or again else [],
                                  1 if need else 0, args.jobs)
    fitted = fitted_rows(rows)
    coefficients, errors = fit(fitted)  # both losses in one fit: they share every term but the head's
    full = [error for error, row in zip(errors, fitted) if not row["case"]["chunked_loss"]]
    chunked = [error for error, row in zip(errors, fitted) if row["case"]["chunked_loss"]]
    runtime = int(statistics.median(row["peak_rss"] - row["peak"] for row in fitted))
    held = held_out_rows(rows)
    from importlib import metadata

    result = {
        "coefficients": coefficients,
        "runtime_bytes": runtime,
        "fit": {"runs": len(fitted), "worst_error_percent": round(max(abs(e) for e in errors), 2),
                "full_logits_runs": len(full), "full_logits_worst_error_percent": round(max(map(abs, full)), 2),
                "chunked_runs": len(chunked), "chunked_worst_error_percent": round(max(map(abs, chunked)), 2),
                "errors_percent": [round(e, 2) for e in errors]},
        "held_out": {"shapes": list(HELD_OUT), "runs": len(held),
                     "errors_percent": [round(e, 2) for e in errors_with(held, coefficients)]},
        "peak": "need" if need else "unconstrained",
        "measured_on": _added(recorded(args, "measured_on"), args)
                       or f"{platform.machine()} {platform.system()}, MLX {mx.__version__} "
                       f"({'Metal' if mx.metal.is_available() else 'CPU'}), mlx-lm {metadata.version('mlx-lm')}, "
                       f"{time.strftime('%Y-%m-%d')}, {EVAL_WIDTH_VARIABLE}="
                       f"{os.environ.get(EVAL_WIDTH_VARIABLE) or EVAL_WIDTH}",
        "command": "python benchmarks/derive_mlx_constants.py" + (" --need" if need else "")
                   + (" --chunked" if args.chunked else "") + (" --checkpointed" if args.checkpointed else "")
                   + (f" --shapes {args.shapes}" if args.shapes else "") + (" --missing" if args.missing else "")
                   + (" --refit" if args.refit else ""),
        "shapes": SHAPES,
        "runs": [dict(shape=row["shape"], **row["case"], peak_bytes=row["peak"], exact_bytes=row["exact"],
                      peak_rss_bytes=row["peak_rss"]) for row in rows],
        "seconds": (recorded(args, "seconds") or 0) + (0 if args.refit else round(time.time() - started)),
    }
    print(json.dumps({key: result[key] for key in ("coefficients", "runtime_bytes", "fit")}, indent=1))
    if not args.dry_run:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    sys.exit(0)


if __name__ == "__main__":
    main()
