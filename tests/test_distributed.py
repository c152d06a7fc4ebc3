"""memfit train on several processes: torchrun with 2 CPU ranks (gloo), and the pieces the runtime is built from.

Each torchrun test starts two real workers (`python -m torch.distributed.run --nproc_per_node 2 -m memfit train`), with
OMP_NUM_THREADS=1 and per-rank logs (--redirects 3), so what each rank printed can be told apart.
"""

import json
import os
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memfit.distributed.collective import Agreement, decide, local_flags
from memfit.distributed.ranks import Ranks, current, shard_rows
from memfit.train.checkpoint import open_checkpoint

DEMO_DATA = str(resources.files("memfit").joinpath("data/demo.jsonl"))
GB = 1024**3


def _env(faults=None, **extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}
    for name in ("MEMFIT_FAULTS", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    if faults:
        env["MEMFIT_FAULTS"] = faults
    return env


def _train_flags(model_dir, out, *flags):
    return ["train", "--model", str(model_dir), "--data", DEMO_DATA, "--output-dir", str(out), "--seq-len", "64",
            "--device", "cpu", *flags]


class Launch:
    """One torchrun of `memfit train` with 2 ranks: its result, each rank's exit code and output."""

    def __init__(self, tmp: Path, args: list[str], faults=None, nproc=2):
        self.log_dir = tmp / f"torchrun-logs-{len(list(tmp.glob('torchrun-logs-*')))}"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   "--log-dir", str(self.log_dir), "--redirects", "3", "-m", "memfit", *args]
        self.result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env(faults))

    def output(self, rank: int, stream: str = "stdout") -> str:
        (path,) = self.log_dir.glob(f"*/attempt_0/{rank}/{stream}.log")
        return path.read_text()

    def exit_codes(self) -> dict[int, int]:
        """Each rank's exit code: torchrun exits 0 or 1 itself, and lists the failed ranks' codes on stderr."""
        if self.result.returncode == 0:
            return {0: 0, 1: 0}
        found = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", self.result.stderr)
        return {int(rank): int(code) for rank, code in found}

    def explain(self) -> str:
        return "\n".join([self.result.stderr[-3000:], *(self.output(r, s)[-2000:] for r in (0, 1)
                                                         for s in ("stdout", "stderr"))])


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(trained: dict, reference: dict, lr: float, initial: dict | None = None) -> None:
    """Two runs that differ only in float32 summation order (2 ranks x B vs 1 process x 2B) trained the same weights.

    Not element by element to rounding: AdamW divides each gradient element by its own running size, so an element
    whose gradient sits at the rounding floor moves by up to lr * |g| / (|g| + eps) the way its noise sign says, and
    the next step's gradients inherit that. `python benchmarks/summation_order.py` measured it (docs/benchmarks.md,
    "summation order"): with AdamW, lora_A[14, 125] of layers.0.mlp.gate_proj got g = -9.5e-10 in one process and
    +8.4e-10 on 2 FSDP ranks at step 2 (its tensor's median |g|: 6.5e-6) and the two ended 1.7e-5 apart (relative
    4e-3, the failure transformers 5.24 exposed), while no tensor differed by more than 1e-4 in norm; with SGD, whose
    step is linear in the gradient, the same runs stay 8e-12 apart. So: what training changed (trained - initial;
    adapters start from the same seed) agrees per tensor within 1e-3 in norm, where rounding averages out (10x the
    worst measured), and no element is more than one AdamW step (lr) apart.
    """
    assert trained.keys() == reference.keys()
    for name, expected in reference.items():
        start = initial[name].float() if initial is not None else 0.0
        change, expected_change = trained[name].float() - start, expected.float() - start
        difference = change - expected_change
        assert difference.norm() <= 1e-3 * expected_change.norm(), (name, float(difference.norm()))
        assert difference.abs().max() <= lr, (name, float(difference.abs().max()))


def _adapter(out):
    return load_file(str(out / "final" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def ddp_run(tiny_model_dir, tmp_path_factory):
    """2 ranks x micro-batch 2 (global batch 4), 3 steps; shared by the tests that compare against it."""
    tmp = tmp_path_factory.mktemp("ddp")
    launch = Launch(tmp, _train_flags(tiny_model_dir, tmp / "run", "--batch-size", "2", "--max-steps", "3"))
    assert launch.result.returncode == 0, launch.explain()
    return launch, tmp / "run"


def test_two_ranks_match_one_process_with_the_doubled_batch(ddp_run, tiny_model_dir, tmp_path):
    """2 ranks x batch 2 = 1 process x batch 4: the same rows per step, the objective normalised over all of them,
    the gradients summed: the same losses and the same adapter."""
    launch, out = ddp_run
    single = subprocess.run([sys.executable, "-m", "memfit",
                             *_train_flags(tiny_model_dir, tmp_path / "one", "--batch-size", "4", "--max-steps", "3")],
                            capture_output=True, text=True, timeout=300, env=_env())
    assert single.returncode == 0, single.stderr
    two, one = _metrics(out), _metrics(tmp_path / "one")
    assert [m["step"] for m in two] == [1, 2, 3]  # one line per step: only rank 0 appends
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["tokens"] == b["tokens"]  # the global step's tokens, not rank 0's share
    # The losses change from step to step, so equal curves are not equal constants.
    assert len({round(m["loss"], 6) for m in one}) == 3
    assert_same_training(_adapter(out), _adapter(tmp_path / "one"), lr=2e-4)
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["distributed"] == "ddp"
    assert [entry["rank"] for entry in run["ranks"]] == [0, 1]
    assert all(entry["peak_rss_bytes"] > 100 * 1024**2 for entry in run["ranks"])
    assert run["estimate_per_rank_bytes"] > 0
    assert open_checkpoint(out).meta["world_size"] == 2


def test_only_rank_0_prints_and_writes(ddp_run):
    launch, out = ddp_run
    assert "finished 3 steps" in launch.output(0)
    assert launch.output(1) == "" and launch.output(1, "stderr") == ""
    # Had rank 1 written too, every event would be there twice.
    events = (out / "events.jsonl").read_text().splitlines()
    texts = [json.loads(line).get("message") for line in events if '"Notice"' in line]
    assert len(texts) == len(set(texts)) and texts
    assert not list(out.glob(".*tmp*")) and not list((out / "checkpoints").glob(".tmp-*"))


def test_oom_on_one_rank_both_recover_with_the_same_losses(ddp_run, tiny_model_dir, tmp_path):
    """Rank 1's first attempt at step 2 runs out of memory: both ranks retry step 2 as 2 micro-batches of 1."""
    _, clean = ddp_run
    out = tmp_path / "run"
    launch = Launch(tmp_path, _train_flags(tiny_model_dir, out, "--batch-size", "2", "--max-steps", "3"),
                    faults="oom@2:rank1")
    assert launch.result.returncode == 0, launch.explain()
    metrics = _metrics(out)
    assert [m["micro_batch"] for m in metrics] == [2, 1, 1] and [m["grad_accum"] for m in metrics] == [1, 2, 2]
    for a, b in zip(metrics, _metrics(clean)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    assert "out of memory at step 2: retrying the same 2 samples as 2 micro-batches of 1 (on rank 1)" \
        in launch.output(0)
    assert json.loads((out / "run.json").read_text())["oom_recoveries"] == 1


def test_limit_on_one_rank_stops_both_with_one_checkpoint_then_resume(tiny_model_dir, tmp_path):
    """Rank 1 leaks 100 MB a step against a limit 0.3 GB above the run's peak: rank 1's guard stops it, rank 0 saves,
    both exit 3. A 1-process resume is refused (world size); a 2-rank resume finishes. Slow (30-60 s): three launches of
    2 real ranks (gloo) each: the stop, the refused 1-process resume, the resume."""
    out = tmp_path / "run"
    limit_gb = 1.0  # the tiny model's ranks peak at ~0.55 GB (run.json of ddp_run); rank 0 stays far below
    launch = Launch(tmp_path, _train_flags(tiny_model_dir, out, "--batch-size", "2", "--max-steps", "30",
                                           "--max-memory", str(limit_gb)), faults="leak@100:rank1")
    assert launch.exit_codes() == {0: 3, 1: 3}, launch.explain()
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "guard_stop" and run["exit_code"] == 3
    peaks = {entry["rank"]: entry["peak_watched_bytes"] for entry in run["ranks"]}
    assert peaks[1] > peaks[0] + 0.2 * GB  # the leak was rank 1's alone
    checkpoints = list((out / "checkpoints").iterdir())
    assert len(checkpoints) == 1
    checkpoint = open_checkpoint(checkpoints[0])  # verifies every checksum
    step = checkpoint.step
    # The reason is rank 1's (the limit crossed, or the rise projected past it), told by rank 0.
    assert f"stopped by the memory guard at step {step}: rank 1: memory " in launch.output(0)
    assert 0 < step < 30 and _metrics(out)[-1]["step"] == step
    assert len(json.loads((checkpoint.path / "rng-ranks.json").read_text())) == 2

    refused = subprocess.run([sys.executable, "-m", "memfit", "train", "--resume", str(checkpoint.path)],
                             capture_output=True, text=True, timeout=120, env=_env())
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "world size 2 -> 1" in refused.stderr, refused.stderr

    resumed = Launch(tmp_path, ["train", "--resume", str(checkpoint.path), "--max-memory", "16"])
    assert resumed.result.returncode == 0, resumed.explain()
    assert f"resumed from {checkpoint.path} at step {step}" in resumed.output(0)
    assert [m["step"] for m in _metrics(out)] == list(range(1, 31))


def test_sigterm_on_one_rank_interrupts_both(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    launch = Launch(tmp_path, _train_flags(tiny_model_dir, out, "--batch-size", "2", "--max-steps", "5"),
                    faults="sigterm@2:rank1")
    assert launch.exit_codes() == {0: 130, 1: 130}, launch.explain()
    assert "interrupted (SIGTERM on rank 1) at step 1" in launch.output(0)
    assert open_checkpoint(out).step == 1


# --- in one process ------------------------------------------------------------------------------------------


def test_deepspeed_is_refused_on_cpu_processes(tiny_model_dir, tmp_path, monkeypatch):
    """DeepSpeed trains on CUDA only (its CPU accelerator needs Intel's extension): refused in one line, before any
    process group or model. (FSDP runs on CPU processes: tests/test_fsdp.py.)"""
    from memfit.config import make_config
    from memfit.errors import UserError
    from memfit.train.loop import Trainer, TrainJob

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for engine in ("zero1", "zero3"):
        trainer = Trainer(TrainJob(str(tiny_model_dir), Path(DEMO_DATA), tmp_path / engine, device="cpu"),
                          make_config(distributed=engine))
        with pytest.raises(UserError, match=f"--distributed {engine} \\(DeepSpeed\\) trains on CUDA GPUs only"):
            trainer.setup()
        assert not (tmp_path / engine).exists()


def test_rank_fields_from_the_launcher_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert current() == Ranks(0, 1, 0, 1) and current().is_main and not current().distributed
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert current() == Ranks(3, 4, 1, 2) and not current().is_main and current().distributed


def test_shard_rows_splits_the_step_evenly_and_the_same_on_every_rank():
    lengths = {row: (row * 37) % 50 + 1 for row in range(24)}
    step = list(range(24))[::-1]
    shards = [shard_rows(step, lengths.__getitem__, rank, 3) for rank in range(3)]
    assert sorted(sum(shards, [])) == sorted(step)  # every row once
    assert [len(shard) for shard in shards] == [8, 8, 8]
    totals = [sum(lengths[row] for row in shard) for shard in shards]
    assert max(totals) - min(totals) <= max(lengths.values())  # interleaved longest-first: balanced
    assert shards == [shard_rows(list(step), lengths.__getitem__, rank, 3) for rank in range(3)]
    assert shard_rows(step, lengths.__getitem__, 0, 1) == sorted(step, key=lambda row: -lengths[row])


def test_decision_names_the_rank_that_raised_each_flag():
    assert not decide(local_flags(0, stop=False, oom=False, interrupted=False, warn=False, watched_bytes=5)).stop
    # The MAX of two ranks' flags: rank 1 stopped, rank 0 saw OOM and warned.
    rank0 = local_flags(0, stop=False, oom=True, interrupted=False, warn=True, watched_bytes=7)
    rank1 = local_flags(1, stop=True, oom=False, interrupted=False, warn=False, watched_bytes=9)
    decision = decide([max(a, b) for a, b in zip(rank0, rank1)])
    assert (decision.stop_rank, decision.oom_rank, decision.interrupted_rank, decision.warn_rank) == (1, 0, None, 0)
    assert decision.max_watched_bytes == 9 and decision.stop
    one = Agreement(Ranks())  # one process: nothing is communicated
    assert one.agree(interrupted=True).interrupted_rank == 0 and one.calls == 0


def _agree_worker(rank: int, world: int, port: int, results) -> None:
    import torch.distributed as dist

    from memfit.distributed.collective import all_reduce_sum

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    agreement = Agreement(Ranks(rank, world, rank, world))
    first = agreement.agree(oom=rank == 1, watched_bytes=100 * (rank + 1))
    second = agreement.agree()
    tensors = [torch.full((3,), float(rank + 1)), torch.full((2, 2), 10.0 * (rank + 1)), torch.tensor(1.5)]
    all_reduce_sum(tensors, bucket_elements=4)  # the first two in one bucket, the scalar alone
    gathered = agreement.gather({"rank": rank})
    results[rank] = (first, second, [t.tolist() for t in tensors], gathered)
    dist.destroy_process_group()


def test_agreement_and_gradient_sum_across_two_gloo_processes():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_agree_worker, args=(2, port, results), nprocs=2, join=True)
    for rank in (0, 1):
        first, second, tensors, gathered = results[rank]
        assert first.oom_rank == 1 and first.stop and first.max_watched_bytes == 200  # both ranks see rank 1's OOM
        assert not second.stop
        assert tensors == [[3.0] * 3, [[30.0, 30.0], [30.0, 30.0]], 3.0]
        assert gathered == [{"rank": 0}, {"rank": 1}]


def test_fault_rank_selector(monkeypatch):
    from memfit import faults

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv(faults.ENV, "oom@3:rank1,leak@50:rank0,save_pause@4:5:rank1,crash@7")
    faults._faults.cache_clear()
    assert faults._faults() == {"oom": "3", "save_pause": "4:5", "crash": "7"}
    monkeypatch.setenv("RANK", "0")
    faults._faults.cache_clear()
    assert faults._faults() == {"leak": "50", "crash": "7"}
