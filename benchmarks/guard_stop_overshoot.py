"""How far past the limit memory gets when it rises inside the forward pass, with and without the guard's stop at
decoder-layer entries; and what that stop costs when nothing is wrong.

Overshoot: the tiny llama (4 decoder layers), LoRA, batch 4 x 64 tokens, `--grad-accum 1` (one micro-batch per
step: without the layer stop, the first safe point is the step's end), guard sampling every 0.1 s (the default),
and `MEMFIT_FAULTS=leak_forward@MB:3`: from step 3 on, every decoder layer's forward call keeps MB megabytes, so
step 3's forward pass rises by 4 x MB. The limit is the peak of a clean run plus 2.5 layers' leak: memory crosses
it in the middle of step 3's forward pass. Each run is a fresh process; its peak is the OS's high-water mark
(VmHWM, which no sampling can miss); overshoot = peak - limit.

Cost, when nothing is wrong: the hook alone, one call of a module with it (the trainer's own,
`memfit.train.step.layer_stop_hook`, both attribute reads taken) against one without, over 200,000 calls; and whole
training micro-steps of the same model (memfit's LoRA model, forward + backward of batch 4 x 64), in one process,
in short blocks alternating with and without the hooks on its decoder layers, so that load from elsewhere on the
machine hits both alike; the slowdown is the median of the adjacent blocks' ratios.

    python benchmarks/guard_stop_overshoot.py [--runs 5] [--leak-mb 100] [--blocks 40] [--write]
                                              [--out docs/benchmarks.md]
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
from importlib import resources
from pathlib import Path

from estimate_accuracy import _cpu_name, write_section  # benchmarks/ is on sys.path when run as a script

MB = 1024**2
DATA = str(resources.files("memfit").joinpath("data/demo.jsonl"))
LAYERS = 4
HOOK_CALLS = 200_000


def _child(spec: dict) -> dict:
    """One training run in this process (a fresh one: VmHWM is this run's peak)."""
    if spec.get("fault"):
        os.environ["MEMFIT_FAULTS"] = spec["fault"]
    from memfit.config import TrainConfig
    from memfit.train import TrainJob, loop
    from memfit.events import Notice

    loop.Trainer.stop_at_layers = spec["hook"]
    notices: list[str] = []

    def on_event(event) -> None:
        if isinstance(event, Notice) and "cut short" in event.message:
            notices.append(event.message)

    config = TrainConfig(seq_len=64, batch_size=4, max_steps=spec["steps"], lr=1e-2, warmup_steps=1,
                         max_memory=spec.get("limit_gb"), save_every=10_000)
    result = loop.train(TrainJob(spec["model_dir"], Path(DATA), Path(spec["out"]), device="cpu"), config, on_event)
    status = Path("/proc/self/status").read_text()
    hwm = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))
    metrics = [json.loads(line) for line in (Path(spec["out"]) / "metrics.jsonl").read_text().splitlines()]
    return {"status": result.status, "step": result.step, "peak_bytes": hwm, "cut_short": notices,
            "step_times": [m["step_time_s"] for m in metrics]}


def _run(spec: dict) -> dict:
    completed = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                               text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if completed.returncode != 0:
        raise SystemExit(f"child failed ({completed.returncode}): {completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def overshoot(model_dir: Path, root: Path, runs: int, leak_mb: int) -> dict:
    clean = _run({"model_dir": str(model_dir), "out": str(root / "clean"), "hook": True, "steps": 4})
    limit = clean["peak_bytes"] + 2.5 * leak_mb * MB
    fault = f"leak_forward@{leak_mb}:3"
    results: dict[bool, list[dict]] = {True: [], False: []}
    for number in range(runs):
        for hook in ((True, False) if number % 2 == 0 else (False, True)):
            spec = {"model_dir": str(model_dir), "out": str(root / f"leak-{hook}-{number}"), "hook": hook,
                    "steps": 6, "fault": fault, "limit_gb": limit / 1024**3}
            results[hook].append(_run(spec))
    return {"clean_peak": clean["peak_bytes"], "limit": limit, "results": results}


class _Running:
    in_micro_batch = (1, 0, 1)  # a training micro-batch runs: the hook reads both attributes


def step_cost(model_dir: Path, blocks: int, steps: int = 10) -> dict:
    """Seconds per training micro-step with and without the layer-stop hooks, alternating blocks in this process."""
    import torch

    from memfit.config import TrainConfig
    from memfit.models.arch import decoder_layers
    from memfit.guard import Guard, MemoryLimit
    from memfit.precision import resolve_precision
    from memfit.train.step import layer_stop_hook
    from memfit.train.model import load_model

    config = TrainConfig(seq_len=64, batch_size=4)
    model = load_model(model_dir, config, resolve_precision("auto", "cpu"), "cpu")
    model.train()
    layers = decoder_layers(model)
    guard = Guard(MemoryLimit(1 << 50, 1 << 50, auto=False, device="cpu"))
    ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))

    def block(hooked: bool) -> float:
        handles = ([layer.register_forward_pre_hook(layer_stop_hook(_Running(), guard, index, len(layers)))
                    for index, layer in enumerate(layers)] if hooked else [])
        started = time.perf_counter()
        for _ in range(steps):
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            model.zero_grad(set_to_none=True)
        elapsed = (time.perf_counter() - started) / steps
        for handle in handles:
            handle.remove()
        return elapsed

    block(False)  # warm-up: first-call allocations and kernel selection
    times: dict[bool, list[float]] = {True: [], False: []}
    ratios = []
    for number in range(blocks):
        pair = {hooked: block(hooked) for hooked in ((True, False) if number % 2 == 0 else (False, True))}
        for hooked, seconds in pair.items():
            times[hooked].append(seconds)
        ratios.append(pair[True] / pair[False] - 1)
    quartiles = statistics.quantiles(ratios, n=4)
    return {"with": statistics.median(times[True]), "without": statistics.median(times[False]),
            "slowdown": statistics.median(ratios) * 100, "q1": quartiles[0] * 100, "q3": quartiles[2] * 100,
            "layers": len(layers)}


def hook_call_cost() -> float:
    """Seconds one module call costs more with the trainer's layer-stop hook than without."""
    import torch

    from memfit.guard import Guard, MemoryLimit
    from memfit.train.step import layer_stop_hook

    guard = Guard(MemoryLimit(1 << 50, 1 << 50, auto=False, device="cpu"))
    plain, hooked = torch.nn.Identity(), torch.nn.Identity()
    hooked.register_forward_pre_hook(layer_stop_hook(_Running(), guard, 0, LAYERS))
    x = torch.zeros(1)

    def timed(module) -> float:
        started = time.perf_counter()
        for _ in range(HOOK_CALLS):
            module(x)
        return (time.perf_counter() - started) / HOOK_CALLS

    samples = [timed(hooked) - timed(plain) for _ in range(5)]
    return statistics.median(samples)


def markdown(args, shoot: dict, cost: dict, per_call_s: float, load: float) -> str:
    leak = args.leak_mb
    rows = ["| layer stop | runs | stopped inside step 3 (before layer) | overshoot, median (min to max) | "
            "peak / limit, max |", "|---|---:|---|---:|---:|"]
    for hook in (True, False):
        results = shoot["results"][hook]
        over = [(r["peak_bytes"] - shoot["limit"]) / MB for r in results]
        where = sorted({message.rsplit("before decoder layer ", 1)[1].split(" of")[0]
                        for result in results for message in result["cut_short"]})
        inside = sum(bool(r["cut_short"]) for r in results)
        rows.append(f"| {'on (default)' if hook else 'off'} | {len(results)} | {inside} of {len(results)}"
                    f"{' (' + ', '.join(where) + ')' if where else ''} | {statistics.median(over):+.0f} MB "
                    f"({min(over):+.0f} to {max(over):+.0f}) | "
                    f"{max(r['peak_bytes'] for r in results) / shoot['limit']:.3f} |")
    step_s = cost["without"]
    lines = [
        "## The guard's stop inside the forward pass",
        "",
        f"Measured with `python benchmarks/guard_stop_overshoot.py --runs {args.runs} --leak-mb {leak} --blocks "
        f"{args.blocks} --write` on {platform.machine()} {platform.system()}, {_cpu_name()}, Python "
        f"{platform.python_version()}; load average {load:.1f} when it started. The tiny llama ({LAYERS} decoder "
        f"layers), LoRA, batch 4 × 64 tokens, `--grad-accum 1`, guard sampling every 0.1 s; "
        f"`MEMFIT_FAULTS=leak_forward@{leak}:3`: from step 3 every decoder layer's forward keeps {leak} MB "
        f"({LAYERS * leak} MB over step 3's forward pass). Limit: a clean run's peak "
        f"({shoot['clean_peak'] / MB:.0f} MB) + 2.5 layers' leak = {shoot['limit'] / MB:.0f} MB. Peak: the "
        "process's VmHWM. Fresh process each, the two settings alternating.",
        "",
        *rows,
        "",
        f"Cost when nothing is wrong: one call of the hook costs {per_call_s * 1e6:.2f} µs (a module with it against "
        f"one without, median of 5 × {HOOK_CALLS:,} calls), {cost['layers']} calls a micro-step = "
        f"{cost['layers'] * per_call_s * 1e6:.1f} µs, {cost['layers'] * per_call_s / step_s * 100:.3f}% of this "
        f"tiny model's {step_s * 1000:.1f} ms micro-step (a larger model's layers take longer, its hook calls the "
        f"same). Whole micro-steps (forward + backward) in {args.blocks} pairs of adjacent {10}-step blocks with and "
        f"without the hooks, in one process: {cost['with'] * 1000:.2f} ms with, {cost['without'] * 1000:.2f} ms "
        f"without; slowdown, median of the pairs {cost['slowdown']:+.2f}% (interquartile range "
        f"{cost['q1']:+.2f}% to {cost['q3']:+.2f}%: the machine's noise).",
        "",
    ]
    if load > (os.cpu_count() or 1):
        lines[-1:-1] = ["", f"The machine had other jobs (load {load:.1f} on {os.cpu_count()} cores): its "
                        "milliseconds are several times a quiet machine's; the overshoot and the ratios are what carry "
                        "over."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--leak-mb", type=int, default=100)
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    from memfit.models import init_model

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        model_dir = init_model("tiny", root / "tiny")
        shoot = overshoot(model_dir, root, args.runs, args.leak_mb)
        cost = step_cost(model_dir, args.blocks)
    body = markdown(args, shoot, cost, hook_call_cost(), load)
    print(body)
    if args.write:
        write_section(Path(args.out), "guard-stop-overshoot", body)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
