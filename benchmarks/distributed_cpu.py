"""1 process vs 2 torchrun ranks (gloo) on CPU: the same global batch, tokens/s, each rank's peak RSS against the
estimate per rank, whether the losses match; and what the collective guard's pieces cost (one agreement, one
gradient all-reduce of the adapters) between 2 gloo processes.

    python benchmarks/distributed_cpu.py [--steps 20] [--repeats 3] [--write] [--out docs/benchmarks.md]

The 2 ranks run twice: DDP (`--distributed ddp`) and FSDP (`--distributed fsdp`, memfit's own FSDP2 sharding over
gloo), each rank's peak RSS against the estimate per rank the run records (`memfit estimate --num-gpus 2
--distributed ...`: with FSDP the weights, gradients and optimizer states over 2).

The model is smollm2-135m's shapes cut to 4 layers (memfit init-model), LoRA r16 on all linear layers, packed
128-token rows of the demo data. The one process gets all the machine's cores as threads; each of the 2 ranks gets
half of them (OMP_NUM_THREADS), so both use the same cores. The two are run alternately, --repeats times each, and
the medians reported, so load from elsewhere on the machine falls on both alike (the load average is reported too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch
from estimate_accuracy import _cpu_name, write_section  # benchmarks/ is on sys.path when run as a script

from memfit.models import init_model

DATA = str(resources.files("memfit").joinpath("data/demo.jsonl"))
MB = 1024**2


def _train(model_dir: Path, out: Path, steps: int, global_batch: int, processes: int, engine: str = "ddp") -> dict:
    cores = os.cpu_count() or 1
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(max(1, cores // processes))}
    env.pop("MEMFIT_FAULTS", None)
    flags = ["train", "--model", str(model_dir), "--data", DATA, "--output-dir", str(out), "--seq-len", "128",
             "--batch-size", str(global_batch // processes), "--device", "cpu", "--max-steps", str(steps),
             "--save-every", str(steps + 1), "--distributed", engine]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                 "-m", "memfit"] if processes > 1 else [sys.executable, "-m", "memfit"])
    completed = subprocess.run(launcher + flags, capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        raise SystemExit(f"{processes} process(es) failed ({completed.returncode}): {completed.stderr[-3000:]}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    run = json.loads((out / "run.json").read_text())
    timed = metrics[2:]  # the first steps pay for warm-up
    peaks = ([entry["peak_rss_bytes"] for entry in run["ranks"]] if run.get("ranks")
             else [max(m["peak_rss_bytes"] for m in metrics)])
    return {"tokens_per_s": sum(m["tokens"] for m in timed) / sum(m["step_time_s"] for m in timed),
            "step_s": statistics.median(m["step_time_s"] for m in timed), "peaks": peaks,
            "estimate": run.get("estimate_per_rank_bytes") or run.get("estimate_bytes"),
            "losses": [m["loss"] for m in metrics]}


def _collective_worker(rank: int, world: int, port: int, adapter_elements: int, results) -> None:
    import torch.distributed as dist

    from memfit.distributed.collective import Agreement, all_reduce_sum
    from memfit.distributed.ranks import Ranks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    agreement = Agreement(Ranks(rank, world, rank, world))
    grads = [torch.randn(adapter_elements)]
    for _ in range(50):  # warm-up
        agreement.agree()
        all_reduce_sum(grads)
    started = time.perf_counter()
    for _ in range(2000):
        agreement.agree(watched_bytes=rank)
    agree_s = (time.perf_counter() - started) / 2000
    started = time.perf_counter()
    for _ in range(200):
        all_reduce_sum(grads)
    reduce_s = (time.perf_counter() - started) / 200
    results[rank] = (agree_s, reduce_s)
    dist.destroy_process_group()


def _collective_costs(adapter_elements: int) -> tuple[float, float]:
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_collective_worker, args=(2, port, adapter_elements, results), nprocs=2, join=True)
    return max(r[0] for r in results.values()), max(r[1] for r in results.values())


def _median_run(results: list[dict]) -> dict:
    """The run of median tokens/s, with every run's rate beside it."""
    ordered = sorted(results, key=lambda result: result["tokens_per_s"])
    return {**ordered[len(ordered) // 2], "all_rates": [result["tokens_per_s"] for result in results]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="global batch (rows per optimizer step)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, alternating")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        model_dir = init_model("smollm2-135m", root / "smol4", num_layers=4)
        load_before = os.getloadavg()[0]
        kinds = [(1, "ddp"), (2, "ddp"), (2, "fsdp")]
        runs: dict[tuple[int, str], list[dict]] = {kind: [] for kind in kinds}
        for repeat in range(args.repeats):
            for processes, engine in kinds:
                runs[processes, engine].append(_train(model_dir, root / f"{processes}-{engine}-{repeat}", args.steps,
                                                      args.batch, processes, engine))
        load_after = os.getloadavg()[0]
        one, two, fsdp = (_median_run(runs[kind]) for kind in kinds)
        events = [json.loads(line) for line in (root / "1-ddp-0" / "events.jsonl").read_text().splitlines()]
    trainable = next(event["trainable_params"] for event in events if event.get("event") == "RunStarted")
    agree_s, reduce_s = _collective_costs(trainable)
    cores = os.cpu_count() or 1
    rows = ["| run | global batch | tokens/s, median (each run) | step s | peak RSS per rank | estimate per rank |",
            "|---|---:|---:|---:|---|---:|"]
    for name, result in (("1 process", one), ("2 ranks, DDP (torchrun, gloo)", two),
                         ("2 ranks, FSDP (torchrun, gloo)", fsdp)):
        peaks = ", ".join(f"{peak / MB:,.0f} MB" for peak in result["peaks"])
        estimate = f"{result['estimate'] / MB:,.0f} MB" if result["estimate"] else "–"
        rates = ", ".join(f"{rate:,.0f}" for rate in result["all_rates"])
        rows.append(f"| {name} | {args.batch} | {result['tokens_per_s']:,.0f} ({rates}) | {result['step_s']:.3f} | "
                    f"{peaks} | {estimate} |")
    diff = max(abs(a - b) / abs(b) for a, b in zip(two["losses"], one["losses"]))
    fsdp_diff = max(abs(a - b) / abs(b) for a, b in zip(fsdp["losses"], one["losses"]))
    # The benchmark's own 2 ranks keep 2 cores busy (load about 2): above that, something else ran.
    shared = " (other jobs ran on the machine: the rates are not a speed comparison)" if load_before > 1.0 else ""
    over_estimate = [peak / result["estimate"] - 1 for result in (two, fsdp) for peak in result["peaks"]
                     if result["estimate"]]
    body = (f"## Several processes on CPU (DDP and FSDP over gloo)\n\n"
            f"Measured by `python benchmarks/distributed_cpu.py --steps {args.steps} --write`: smollm2-135m's shapes "
            f"cut to 4 layers, LoRA r16 on all linear layers ({trainable:,} trainable), packed 128-token rows, fp32, "
            f"{args.steps} steps (the first 2 left out of the rates); 1 process with {cores} threads against 2 ranks "
            f"with {max(1, cores // 2)} each, {args.repeats} runs of each, alternating; {_cpu_name()}, "
            f"{platform.system()}, torch {torch.__version__}; load average {load_before:.1f} before, "
            f"{load_after:.1f} after{shared}.\n\n"
            + "\n".join(rows) + "\n\n"
            f"Per-step losses of the 2 ranks against the 1 process: max relative difference {diff:.1e} under DDP, "
            f"{fsdp_diff:.1e} under FSDP (float summation order). Between 2 gloo processes on this machine, one agreement of the guard (a 5-number MAX "
            f"all-reduce) took {agree_s * 1e3:.3f} ms and the step-end all-reduce of the {trainable:,} adapter "
            f"gradients {reduce_s * 1e3:.2f} ms (the mean of 2000 and of 200 calls, on the slower rank). A step has "
            "one agreement per micro-batch plus one at its end.\n\n"
            "On one machine the ranks share its RAM: each holds a whole copy of the model and its own activations, "
            "so the per-rank peak is close to the 1-process peak, and the auto limit splits the available memory "
            "between them. FSDP holds 1/2 of the weights, gradients and optimizer states per rank, plus the layers "
            "being computed; on this small model the process's own footprint (torch, transformers, the data) is "
            "most of the peak, so sharding saves little here. The ranks' peaks are "
            f"{min(over_estimate):+.0%} to {max(over_estimate):+.0%} above the per-rank estimate (`memfit estimate "
            "--num-gpus 2 [--distributed fsdp]`); what the estimate leaves out: every rank loads the whole model "
            "before FSDP shards it, the collectives' buffers, and gloo's own memory. FSDP's steps are slower than "
            "DDP's here: each layer's weights are all-gathered in forward and again in backward, and every "
            "micro-batch's gradients reduce-scattered, over gloo.\n")
    print(body)
    if args.write:
        write_section(Path(args.out), "distributed-cpu", body)


if __name__ == "__main__":
    main()
