"""What the memory guard costs: one reading, the sampler thread's CPU, and the slowdown of a compute-bound loop.

- `read_memory("cpu")`: median over 10,000 calls.
- The thread's own CPU time (time.thread_time inside the thread) per wall second, with the main thread idle, for
  the Guard's sampler (reading + the early-stop check) at 100 ms and at 10 ms.
- A CPU-bound torch matmul loop, the same number of iterations with and without a running Guard, in adjacent
  pairs (order alternating) so that drift of the machine hits both alike; the slowdown is the median pair ratio.

    python benchmarks/guard_overhead.py [--write] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import threading
import time
from pathlib import Path

import torch
from estimate_accuracy import _cpu_name, write_section  # benchmarks/ is on sys.path when run as a script

from memfit.guard import Guard, MemoryLimit, read_memory

GB = 1024**3
READS = 10_000
IDLE_SECONDS = 5.0
MATMUL_SIZE = 1024
MATMUL_RUN_SECONDS = 0.5
MATMUL_PAIRS = 16


def read_cost_us() -> float:
    read_memory("cpu")  # warm imports and file caches
    costs = []
    for _ in range(READS):
        started = time.perf_counter_ns()
        read_memory("cpu")
        costs.append(time.perf_counter_ns() - started)
    return statistics.median(costs) / 1000


def _idle_limit() -> MemoryLimit:
    # Far above anything this script uses: the guard reads and checks, and never stops.
    return MemoryLimit(1 << 50, 1 << 50, auto=False, device="cpu")


def thread_cpu_fraction(interval_s: float) -> tuple[float, int]:
    """CPU seconds the Guard's sampler thread uses per wall second while the main thread sleeps; and its reads."""
    thread_times: list[float] = []

    def timed_reader(device: str):
        sample = read_memory(device)
        if threading.current_thread().name == "memfit-memory-sampler":
            thread_times.append(time.thread_time())
        return sample

    guard = Guard(_idle_limit(), interval_s=interval_s, reader=timed_reader)
    with guard:
        started = time.monotonic()
        time.sleep(IDLE_SECONDS)
        wall = time.monotonic() - started
    # thread_time is the sampler thread's clock; the first reading is its start.
    cpu = thread_times[-1] - thread_times[0] if len(thread_times) > 1 else 0.0
    return cpu / wall, len(thread_times)


def matmul_overhead() -> dict:
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE)

    def loop(iterations: int, guarded: bool) -> float:
        guard = Guard(_idle_limit(), interval_s=0.1) if guarded else None
        if guard is not None:
            guard.start()
        started = time.perf_counter()
        for _ in range(iterations):
            torch.mm(a, b)
        elapsed = time.perf_counter() - started
        if guard is not None:
            guard.stop()
        return elapsed

    loop(3, False)
    per_iteration = loop(10, False) / 10
    iterations = max(10, int(MATMUL_RUN_SECONDS / per_iteration))
    # Short runs in adjacent pairs, the order alternating: a busy neighbour or a clock change hits both halves of
    # a pair alike, and the ratio within each pair cancels it.
    without, with_guard, ratios = [], [], []
    for pair in range(MATMUL_PAIRS):
        order = (False, True) if pair % 2 == 0 else (True, False)
        times = {guarded: loop(iterations, guarded) for guarded in order}
        without.append(times[False])
        with_guard.append(times[True])
        ratios.append(times[True] / times[False] - 1)
    quartiles = statistics.quantiles(ratios, n=4)
    return {"iterations": iterations, "without_s": statistics.median(without),
            "with_s": statistics.median(with_guard), "slowdown": statistics.median(ratios) * 100,
            "q1": quartiles[0] * 100, "q3": quartiles[2] * 100}


def markdown(read_us: float, idle: dict[float, tuple[float, int]], matmul: dict) -> str:
    lines = [
        "## Guard overhead",
        "",
        f"Measured with `python benchmarks/guard_overhead.py --write` on {platform.machine()} {platform.system()}, "
        f"{_cpu_name()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} intra-op threads), Python {platform.python_version()}.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| `read_memory(\"cpu\")`, median of {READS:,} calls | {read_us:.1f} µs |",
    ]
    for interval, (fraction, reads) in idle.items():
        lines.append(f"| sampler thread CPU at {interval * 1000:.0f} ms ({reads} reads in {IDLE_SECONDS:.0f} s idle) "
                     f"| {fraction * 100:.3f}% of one core |")
    lines += [
        f"| {MATMUL_SIZE}×{MATMUL_SIZE} fp32 matmul loop, {matmul['iterations']} iterations, without guard "
        f"(median of {MATMUL_PAIRS} runs) | {matmul['without_s']:.3f} s |",
        f"| same loop with the guard's thread at 100 ms | {matmul['with_s']:.3f} s |",
        f"| slowdown, median of {MATMUL_PAIRS} adjacent pairs (interquartile range) | {matmul['slowdown']:+.2f}% "
        f"({matmul['q1']:+.2f}% to {matmul['q3']:+.2f}%) |",
        "",
        "The thread's CPU time is measured inside the thread (`time.thread_time`), so it is the guard's own cost, "
        "wake-ups included; the slowdown is the ratio within pairs of runs taken back to back, with and without the "
        "thread, so that load from elsewhere on the machine cancels; its interquartile range is the noise left.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    read_us = read_cost_us()
    idle = {interval: thread_cpu_fraction(interval) for interval in (0.1, 0.01)}
    matmul = matmul_overhead()
    body = markdown(read_us, idle, matmul)
    print(body)
    if args.write:
        write_section(Path(args.out), "guard-overhead", body)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
