"""The estimator's speed machinery: the batch solver on synthetic memory curves, the traces kept on disk, and the
estimate from cached traces without torch or transformers (memfit.estimate.solve, memfit.cache)."""

import json
import math
import os
import subprocess
import sys

import pytest

from memfit.config import TrainConfig
from memfit import cache
from memfit.estimate import cuts, memory
from memfit.estimate.memory import GB, Hardware, estimate_memory, resolve_dtypes, solve_max_batch
from memfit.estimate.solve import largest_fitting
from memfit.models import ARCHITECTURES

MB = 1024**2


def _truth(total, budget, limit):
    """The largest fitting batch by plain bisection (the curves here do not fall)."""
    if total(1) > budget:
        return 0
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if total(mid) <= budget else (lo, mid - 1)
    return lo


def test_solver_on_a_line_needs_four_evaluations():
    total = lambda batch: 10 * GB + batch * 300 * MB  # noqa: E731
    solution = largest_fitting(total, 40 * GB, 65536)
    assert solution.batch == (30 * GB) // (300 * MB)
    assert solution.evaluations <= 4  # 1, 2, the answer, the answer + 1


def test_solver_on_a_flat_then_rising_curve_terminates_fast():
    """A full fine-tune: the optimizer step's peak (flat in the batch) until the activations take over at batch
    1000; issue 16's solver took the slope between batch 1 and 2 (1 byte), guessed 65,536 and stepped down 2% at
    a time (about 400 traced estimates)."""
    calls = []

    def total(batch):
        calls.append(batch)
        return 22 * GB if batch <= 1000 else 22 * GB + (batch - 1000) * MB

    solution = largest_fitting(total, 22 * GB + 500 * MB, 65536)
    assert solution.batch == 1500
    assert solution.evaluations == len(calls) <= 16  # doubling to 1024, then the line through the rising part
    # Flat where the answer is (just past the bend), and flat to the limit.
    assert largest_fitting(total, 22 * GB, 65536).batch == 1000
    assert largest_fitting(lambda batch: 22 * GB, 24 * GB, 65536).evaluations <= 17
    assert largest_fitting(total, 21 * GB, 65536).batch == 0


@pytest.mark.parametrize("seed", range(3))
def test_solver_is_exact_and_short_on_bent_and_stepped_curves(seed):
    import random

    rng = random.Random(seed)
    for _ in range(300):
        lines = [(rng.randint(0, 2**35), rng.randint(0, 2**28)) for _ in range(rng.randint(1, 4))]
        step = rng.randint(1, 50)
        limit = rng.choice([65536, 1024, 100])
        curves = [  # (curve, evaluations allowed beyond log2(limit))
            # Phases: the highest of a few lines sets the peak (what the lines through batch 1 and 2 give).
            (lambda b, lines=lines: max(a + s * b for a, s in lines), 5),
            # Steps (the loss head's chunk grows in steps): no line helps, bisection does.
            (lambda b, a=lines[0][0], s=lines[0][1] + 1, step=step: a + s * math.ceil(b / step) * step,
             math.log2(limit) + 8),
        ]
        for total, extra in curves:
            budget = total(1) + rng.randint(-(2**20), 2**38)
            solution = largest_fitting(total, budget, limit)
            assert solution.batch == _truth(total, budget, limit)
            assert solution.evaluations <= math.log2(limit) + extra


@pytest.mark.parametrize("device", ["cpu", "cuda", "mps"])
@pytest.mark.parametrize("dtype", ["auto", "fp32", "bf16", "fp16", "bf16-pure"])
def test_precision_by_names_is_resolve_precision(dtype, device):
    from memfit.errors import UserError
    from memfit.precision import resolve_precision

    try:
        real = resolve_precision(dtype, device)
    except UserError:
        with pytest.raises(UserError):
            resolve_dtypes(dtype, device)
        return
    named = resolve_dtypes(dtype, device)
    assert named.torch() == real
    assert (named.compute_bytes, named.trainable_bytes, named.frozen_bytes, named.autocast) == (
        real.compute_bytes, real.trainable_bytes, real.frozen_bytes, real.autocast)


def _forget_this_process():
    """Drop the in-process caches, so the next estimate reads the disk cache (a new process would)."""
    from memfit.models import arch

    memory._TRACE_CACHE.clear()
    arch._CACHE.clear()


def test_a_cached_second_estimate_equals_the_first(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path / "cache"))
    hf_config = ARCHITECTURES["tiny"].to_hf_config()
    config = TrainConfig(method="lora", lora_rank=5, seq_len=64, batch_size=3)
    hardware = Hardware("cpu", 8 * GB)
    _forget_this_process()
    before = dict(memory.TRACE_STATS)
    first = estimate_memory(hf_config, config, hardware)
    cuts = memory.cuts_of(hf_config, memory.arch_info(hf_config))
    assert cuts == (1, 2)  # tiny has 4 layers of one kind: cuts of 1 and 2 layers, each traced once
    assert memory.TRACE_STATS["traced"] == before["traced"] + len(cuts)
    _forget_this_process()
    second = estimate_memory(hf_config, config, hardware)
    assert memory.TRACE_STATS["traced"] == before["traced"] + len(cuts) and memory.TRACE_STATS["from_disk"] > before[
        "from_disk"]
    assert second == first
    # From the recorded config alone (what `memfit estimate` uses for a model estimated before): the same.
    _forget_this_process()
    record = cache.ConfigRecord.of(hf_config)
    assert estimate_memory(record, config, hardware) == first
    # A setting the trace reads is a new trace: from the record, that is a miss, not a guess.
    with pytest.raises(cache.CacheMiss):
        estimate_memory(record, config.model_copy(update={"seq_len": 65}), hardware)
    # One it does not read shares the trace.
    assert estimate_memory(record, config.model_copy(update={"lr": 1e-3, "max_steps": 7}), hardware).total_bytes \
        == first.total_bytes


def test_batches_up_to_a_checked_answer_come_from_the_lines_exactly(tmp_path, monkeypatch):
    """When every phase of every cut is on its line at the answer too, each batch up to it is estimated from the
    lines (no trace), and that is what tracing it gives, byte for byte."""
    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path / "cache"))
    _forget_this_process()
    hf_config = ARCHITECTURES["tiny"].to_hf_config()
    # Full logits, no checkpointing (as this test was written before checkpointing became the default): linear.
    config = TrainConfig(method="lora", seq_len=64, chunked_loss=False, grad_checkpointing=False)
    hardware = Hardware("cuda", 1 * GB)
    solved = solve_max_batch(hf_config, config, hardware)
    assert solved.how == "lines, checked" and solved.batch > 10
    traced = memory.TRACE_STATS["traced"]
    middle = config.model_copy(update={"batch_size": solved.batch // 2})
    from_lines = estimate_memory(hf_config, middle, hardware)
    assert memory.TRACE_STATS["traced"] == traced
    monkeypatch.setattr(cuts, "lines_hold_to", lambda *args: 0)
    assert estimate_memory(hf_config, middle, hardware) == from_lines
    assert memory.TRACE_STATS["traced"] == traced + len(memory.cuts_of(hf_config, memory.arch_info(hf_config)))


def test_the_flat_then_rising_full_fine_tune_solves_in_a_few_traces(tmp_path, monkeypatch):
    """Issue 16: llama-3.2-1b, full, seq 2048, gradient checkpointing: 22.5 GB at batch 1 and 2 (the optimizer
    step), 24 GB of device memory: a handful of traces, not hundreds."""
    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path / "cache"))
    _forget_this_process()
    hf_config = ARCHITECTURES["llama-3.2-1b"].to_hf_config()
    config = TrainConfig(method="full", seq_len=2048, grad_checkpointing=True)
    hardware = Hardware("cuda", 24 * GB)
    traced = memory.TRACE_STATS["traced"]
    solved = solve_max_batch(hf_config, config, hardware)
    assert solved.batch >= 3
    # 2 cuts at batch 1 and 2, then at each batch traced after: the check, and here a short search, because the
    # layers' backward is flat from batch 1 to 2 (its peak is where all gradients are there) and later peaks at
    # another moment, which the lines through 1 and 2 cannot see.
    assert solved.traced_estimates <= 4
    assert memory.TRACE_STATS["traced"] - traced == 4 + 2 * solved.traced_estimates
    assert solved.line_evaluations <= 20
    at = estimate_memory(hf_config, config.model_copy(update={"batch_size": solved.batch}), hardware)
    over = estimate_memory(hf_config, config.model_copy(update={"batch_size": solved.batch + 1}), hardware)
    assert at.fits and not over.fits


def _run_cli(args, cache_dir, probe_imports=True):
    code = (
        "import sys\n"
        "from memfit.cli import main\n"
        f"status = main({args!r})\n"
        "print('IMPORTED', sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules), "
        "file=sys.stderr)\n"
        "sys.exit(status)\n"
    )
    env = {**os.environ, "MEMFIT_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    imported = [line for line in completed.stderr.splitlines() if line.startswith("IMPORTED")][-1]
    return json.loads(completed.stdout), imported


def test_a_second_cli_estimate_needs_neither_torch_nor_a_trace(tmp_path):
    # --dtype given: `auto` on a machine with a GPU driver asks torch whether the GPU has bf16.
    args = ["estimate", "--model", "tiny", "--method", "lora", "--seq-len", "64", "--batch-size", "2",
            "--device", "cuda", "--dtype", "bf16", "--memory-gb", "1", "--json", "--no-calibrate"]
    first, imported_first = _run_cli(args, tmp_path / "cache")
    traces = sorted(p.name for p in (tmp_path / "cache" / "estimate" / "trace").glob("*.json"))
    assert "torch" in imported_first and traces
    second, imported_second = _run_cli(args, tmp_path / "cache")
    assert second == first
    assert imported_second == "IMPORTED []"
    assert sorted(p.name for p in (tmp_path / "cache" / "estimate" / "trace").glob("*.json")) == traces
