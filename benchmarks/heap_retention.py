"""Where the estimate of whole smollm2-135m LoRA with gradient checkpointing loses its bytes: glibc's heap at the peak.

Each case trains the whole model (30 layers, 135M params) for 3 steps in a fresh child, as
memfit.estimate.measure does, while a thread samples the child's RSS (RssAnon/RssFile) and, at each new high,
glibc's own account of its heap (malloc_info, all arenas): the heap's size, what of it is free (freed by the step
but kept by glibc), and the blocks it mapped apart (requests above the mmap threshold, returned when freed). Each
case runs twice: with memfit's mmap threshold (1 MiB, memfit.allocator) and with a 64 KiB one, which sends the
step's mid-sized tensors (hidden-sized activations at 2 x 128 tokens are 590 KB) to mmap, so their memory goes back
when they are freed. Reported with the estimate's error on the model part (docs/benchmarks.md, "Where the LoRA
checkpointing estimate falls short").

    python benchmarks/heap_retention.py [--write]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MB = 1024**2
CASES = [
    dict(method="lora", dtype="fp32", batch_size=2, seq_len=128),
    dict(method="lora", dtype="fp32", batch_size=2, seq_len=256),
    dict(method="lora", dtype="fp32", batch_size=4, seq_len=256),
]
THRESHOLDS = (1 << 20, 64 << 10)


def _status() -> dict:
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            values[key] = int(value.split()[0]) * 1024
    return values


def _heap(libc, scratch: str) -> dict:
    """glibc's totals over all arenas (malloc_info's closing elements)."""
    stream = libc.fopen(scratch.encode(), b"w")
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    text = Path(scratch).read_text()
    totals = text[text.rfind("</heap>"):]
    free = sum(int(size) for size in re.findall(r'<total type="(?:fast|rest)" count="\d+" size="(\d+)"', totals))
    system = int(re.search(r'<system type="current" size="(\d+)"', totals).group(1))
    mapped = int(re.search(r'<total type="mmap" count="\d+" size="(\d+)"', totals).group(1))
    return {"heap_bytes": system, "heap_free_bytes": free, "mapped_bytes": mapped}


def child(model_dir: str, case: dict, threshold: int) -> None:
    """Run the measurement's steps with `threshold` and print the RSS and heap at the peak as one JSON line."""
    import memfit.allocator as allocator

    libc = ctypes.CDLL("libc.so.6")
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    scratch = tempfile.mktemp(prefix="malloc-info-")
    configure = allocator.configure

    def configured(policy=None):
        chosen = configure(policy)
        allocator.fix_mmap_threshold(threshold)
        return chosen

    allocator.configure = configured
    at_peak: dict = {"VmRSS": 0}
    done = threading.Event()

    def sample() -> None:
        nonlocal at_peak
        while not done.is_set():
            now = _status()
            if now["VmRSS"] > at_peak["VmRSS"]:
                at_peak = {**now, **_heap(libc, scratch)}
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    from memfit.estimate.measure import run_steps

    result = run_steps(model_dir, case, 3, "cpu")
    done.set()
    sampler.join()
    print(json.dumps({"peak_rss_bytes": result["peak_rss_bytes"], "at_peak": at_peak}))


def run() -> list[dict]:
    from transformers import AutoConfig

    from memfit.config import TrainConfig
    from memfit.estimate.memory import GB, Hardware, estimate_memory
    from memfit.models import init_model

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = init_model("smollm2-135m", Path(scratch) / "smol30")
        hf_config = AutoConfig.from_pretrained(model_dir)
        for case in CASES:
            estimate = estimate_memory(hf_config, TrainConfig(**case), Hardware("cpu", 16 * GB))
            for threshold in THRESHOLDS:
                completed = subprocess.run([sys.executable, __file__, "--child", str(model_dir), json.dumps(case),
                                            str(threshold)], capture_output=True, text=True, check=True)
                measured = json.loads(completed.stdout.strip().splitlines()[-1])
                peak = measured["peak_rss_bytes"]
                baseline = estimate.baseline_bytes
                rows.append(dict(case=case, threshold=threshold, estimate=estimate.process_bytes, measured=peak,
                                 model_error=(estimate.process_bytes - peak) / (peak - baseline) * 100,
                                 **measured["at_peak"]))
                print(json.dumps({key: value for key, value in rows[-1].items()}), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    import platform

    lines = [
        "### Where the LoRA checkpointing estimate falls short: glibc's heap at the peak",
        "",
        f"Measured with `python benchmarks/heap_retention.py --write` on {platform.machine()} {platform.system()}: "
        "whole smollm2-135m (30 layers), LoRA fp32 with gradient checkpointing, 3 steps in a fresh child; at the "
        "child's RSS peak, glibc's heap (malloc_info, all arenas) and what of it is free, i.e. freed by the step "
        "and kept. The estimate is the same for both thresholds.",
        "",
        "| batch × seq | mmap threshold | estimate MB | measured MB | model part error | RssAnon MB | heap MB | "
        "heap free MB | mapped apart MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        case = row["case"]
        lines.append(f"| {case['batch_size']} × {case['seq_len']} | {row['threshold'] // 1024} KiB | "
                     f"{row['estimate'] / MB:,.0f} | {row['measured'] / MB:,.0f} | {row['model_error']:+.1f}% | "
                     f"{row['RssAnon'] / MB:,.0f} | {row['heap_bytes'] / MB:,.0f} | "
                     f"{row['heap_free_bytes'] / MB:,.0f} | {row['mapped_bytes'] / MB:,.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args()
    table = markdown(run())
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from estimate_accuracy import publish

    publish(table, "heap-retention", args.write)


if __name__ == "__main__":
    main()
