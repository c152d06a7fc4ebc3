"""What memfit adds to a training step over a bare transformers + PEFT loop, on a full-depth model.

Same model (smollm2-135m's shapes, all 30 layers by default, random init, fp32), LoRA r16 on every linear layer,
batch 4 x 256, AdamW (fused), the same thread count and glibc allocator policy for every row. Each row is a fresh
child process; rows alternate (A B C D A B C D ...), so load from elsewhere hits them alike:

- bare, causal: `model(input_ids, labels=...).loss`, no position ids: transformers' own loss and plain causal attention;
- bare, packed: the same with position ids restarting at each of the row's three documents (100 + 90 + 66 tokens),
  which transformers turns into a block-diagonal mask (what memfit's packing does);
- bare, packed + chunked loss: the same through memfit's chunked cross-entropy (`memfit.train.chunked_loss`);
- bare, packed + chunked loss + fused LoRA: the same with memfit's fused LoRA linear (`memfit.train.lora_linear`)
  in place of PEFT's forward;
- memfit train: the real CLI on packed plain text (`--seq-len 256 --batch-size 4`, ~1,024 tokens a step), with its
  guard, layer hooks, metrics and checkpoint-free run.

tokens/s over steps 2..N (the first step is warm-up). The bare rows differ from one another only in the piece named;
memfit train from the fused row in everything memfit does around the step.

    python benchmarks/step_cost.py [--layers 30] [--steps 8] [--repeats 3] [--threads 1] [--rows ...] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from estimate_accuracy import write_section  # noqa: E402
from train_vs_hf import cpu_name, run_child, smollm2_and_text, versions  # noqa: E402

MARK = "step-cost"
ROWS = {"bare-causal": "bare transformers + PEFT, causal, HF loss",
        "bare-packed": "bare, packed position ids (block mask), HF loss",
        "bare-chunked": "bare, packed position ids, memfit's chunked loss",
        "bare-fused": "bare, packed position ids, chunked loss, memfit's fused LoRA linear",
        "memfit": "memfit train (packed text, guard on)"}
BATCH, SEQ, DOCS = 4, 256, (100, 90, 66)
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def bare_child(row: str, model_dir: str, steps: int) -> None:
    """One bare loop in this process; prints {"tokens_per_s": ...} over steps 2..N."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from memfit.allocator import configure
    from memfit.train.chunked_loss import head_returns_hidden, linear_cross_entropy
    from memfit.train.lora_linear import fuse_lora_linears
    from memfit.train.losses import every_next_token

    configure()  # MEMFIT_MALLOC, as memfit train does
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(**LORA))
    if row == "bare-fused":
        fuse_lora_linears(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=True)
    vocab = model.config.vocab_size
    positions = torch.cat([torch.arange(n) for n in DOCS]).repeat(BATCH, 1)
    times = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (BATCH, SEQ))
        started = time.perf_counter()
        if row == "bare-causal":
            loss = model(input_ids=ids, labels=ids).loss
        elif row == "bare-packed":
            loss = model(input_ids=ids, position_ids=positions, labels=ids).loss
        else:
            scored = every_next_token(ids)
            with head_returns_hidden(model) as head:
                hidden = model(input_ids=ids, position_ids=positions).logits
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, scored.index)
            loss = linear_cross_entropy(hidden, head, scored.targets.index_select(0, scored.index),
                                        scored.weights.index_select(0, scored.index), torch.float32)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    print(json.dumps({"tokens_per_s": BATCH * SEQ * (steps - 1) / sum(times[1:])}))


def run_row(row: str, model_dir: Path, data: Path, work: Path, steps: int) -> dict:
    log = work / f"log-{row}.txt"
    if row == "memfit":
        out = work / "run"
        command = [sys.executable, "-m", "memfit", "train", "--model", str(model_dir), "--data", str(data),
                   "--output-dir", str(out), "--max-steps", str(steps), "--method", "lora", "--lora-rank", "16",
                   "--lora-alpha", "32", "--lora-dropout", "0", "--batch-size", str(BATCH), "--grad-accum", "1",
                   "--seq-len", str(SEQ), "--dtype", "fp32", "--device", "cpu", "--no-grad-checkpointing",
                   "--seed", "0", "--save-every", "100000", "--memory-report-interval", "100000",
                   "--log-every", "1"]
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--child", row, "--model-dir", str(model_dir),
                   "--steps", str(steps)]
    run = run_child(command, log)
    if run["rc"] != 0:
        raise SystemExit(f"{row}: exit {run['rc']}, see {log}")
    if row == "memfit":
        metrics = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()][1:]
        tokens_per_s = sum(m["tokens"] for m in metrics) / sum(m["step_time_s"] for m in metrics)
        subprocess.run(["rm", "-rf", str(work / "run")], check=True)
    else:
        tokens_per_s = json.loads(log.read_text().strip().splitlines()[-1])["tokens_per_s"]
    return {"row": row, "tokens_per_s": tokens_per_s, "other_load": run["other_load_cores"] or 0.0}


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def rows_flag(args) -> str:
    return "" if args.rows == ",".join(ROWS) else f" --rows {args.rows}"


def markdown(runs: list[dict], args, loads: tuple[float, float], text_stats: str) -> str:
    first = runs[0]["row"]
    base = statistics.median(r["tokens_per_s"] for r in runs if r["row"] == first)
    lines = [
        "## What memfit adds to a step",
        "",
        f"Measured with `python benchmarks/step_cost.py --layers {args.layers} --steps {args.steps} --repeats "
        f"{args.repeats} --threads {args.threads}{rows_flag(args)} --write` on {platform.machine()} "
        f"{platform.system()}, {cpu_name()}, {time.strftime('%Y-%m-%d')}; {versions()}; load average {loads[0]:.1f} "
        f"before, {loads[1]:.1f} after.",
        "",
        f"smollm2-135m's shapes, {args.layers} layers (random init, fp32), LoRA r16 on all linear layers, batch "
        f"{BATCH} × {SEQ}, AdamW (fused), OMP_NUM_THREADS={args.threads} and MEMFIT_MALLOC=threshold (memfit's "
        f"default) for every row, one fresh process per run, rows alternating; tokens/s over steps 2..{args.steps}, "
        f"median (min–max) of {args.repeats}. memfit trains on packed plain text ({text_stats}), the bare loops on "
        f"random tokens in rows of three documents ({' + '.join(map(str, DOCS))} tokens).",
        "",
        "| row | tokens/s | ÷ the first row's | other load |",
        "|---|---:|---:|---:|",
    ]
    for row, label in ROWS.items():
        mine = [r for r in runs if r["row"] == row]
        if mine:
            speed = [r["tokens_per_s"] for r in mine]
            lines.append(f"| {label} | {_spread(speed)} | {statistics.median(speed) / base:.2f}× | "
                         f"{statistics.median(r['other_load'] for r in mine):.2f} |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", default=",".join(ROWS), help="which rows, comma-separated (default: all)")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--child", choices=[r for r in ROWS if r != "memfit"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        bare_child(args.child, args.model_dir, args.steps)
        return
    rows = args.rows.split(",")
    if unknown := [row for row in rows if row not in ROWS]:
        parser.error(f"--rows: no row {unknown[0]!r} (rows: {', '.join(ROWS)})")
    os.environ.update(OMP_NUM_THREADS=str(args.threads), MEMFIT_MALLOC="threshold")
    first_load = os.getloadavg()[0]
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        model_dir, data, text_stats = smollm2_and_text(work, args.layers)
        for repeat in range(args.repeats):
            for row in rows:
                run = run_row(row, model_dir, data, work, args.steps)
                runs.append(run)
                print(f"{repeat + 1} {row}: {run['tokens_per_s']:.1f} tokens/s, other load {run['other_load']:.2f}",
                      flush=True)
    body = markdown(runs, args, (first_load, os.getloadavg()[0]), text_stats)
    print(body)
    if args.write:
        write_section(HERE.parent / "docs" / "benchmarks.md", MARK, body)


if __name__ == "__main__":
    main()
