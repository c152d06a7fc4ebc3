"""memfit train --distributed fsdp on 2 CPU ranks (torchrun, gloo): memfit's own FSDP2 sharding, against one process.

The torchrun launches reuse tests/test_distributed.py's helpers. One guard-stopped run and its resume cover the
losses, the checkpoint and final/ (the resumed run's curve must be the uninterrupted one-process curve).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memfit.config import TrainConfig
from memfit.distributed import engines
from memfit.errors import UserError
from memfit.train.checkpoint import open_checkpoint
from test_distributed import DEMO_DATA, GB, Launch, _adapter, _env, _metrics, _train_flags, assert_same_training

STEPS = 8


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory):
    """1 process x batch 4, what 2 ranks x batch 2 must reproduce."""
    out = tmp_path_factory.mktemp("fsdp-one") / "run"
    single = subprocess.run([sys.executable, "-m", "memfit",
                             *_train_flags(tiny_model_dir, out, "--batch-size", "4", "--max-steps", str(STEPS))],
                            capture_output=True, text=True, timeout=300, env=_env())
    assert single.returncode == 0, single.stderr
    return out


def test_guard_stop_on_one_rank_then_resume_matches_one_process(one_process, tiny_model_dir, tmp_path):
    """Rank 1 leaks 150 MB a step against a 1 GB limit (the tiny model's FSDP ranks peak at ~0.55 GB): its guard
    stops both ranks at an agreed safe point with exit 3 and one checkpoint that verifies; a 2-rank resume finishes.
    Both halves together give the one-process losses step for step, and the same adapter in final/. Slow (30-60 s): FSDP
    runs of 2 real ranks (stop, resume) and a 1-process reference run."""
    out = tmp_path / "run"
    flags = ["--batch-size", "2", "--max-steps", str(STEPS), "--distributed", "fsdp"]
    stopped = Launch(tmp_path, _train_flags(tiny_model_dir, out, *flags, "--max-memory", "1.0"),
                     faults="leak@150:rank1")
    assert stopped.exit_codes() == {0: 3, 1: 3}, stopped.explain()
    assert "fsdp: 5 units fully sharded over 2 ranks (gloo)" in stopped.output(0)  # 4 decoder layers + the root
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "guard_stop" and run["distributed"] == "fsdp"
    peaks = {entry["rank"]: entry["peak_watched_bytes"] for entry in run["ranks"]}
    assert peaks[1] > peaks[0] + 0.2 * GB  # the leak was rank 1's alone
    (checkpoint_dir,) = (out / "checkpoints").iterdir()
    checkpoint = open_checkpoint(checkpoint_dir)  # every checksum verifies
    step = checkpoint.step
    assert 0 < step < STEPS and f"stopped by the memory guard at step {step}: rank 1: memory " in stopped.output(0)
    assert checkpoint.meta["world_size"] == 2
    # The one-process format: optimizer states keyed by parameter index, full (unsharded) tensors.
    optimizer = torch.load(checkpoint.path / "optimizer.pt", weights_only=True)
    one_optimizer = torch.load(one_process / "checkpoints" / f"step-{STEPS}" / "optimizer.pt", weights_only=True)
    assert optimizer["state"].keys() == one_optimizer["state"].keys()
    assert all(type(state["exp_avg"]) is torch.Tensor for state in optimizer["state"].values())
    assert optimizer["state"][0]["exp_avg"].shape == one_optimizer["state"][0]["exp_avg"].shape

    resumed = Launch(tmp_path, ["train", "--resume", str(checkpoint.path), "--max-memory", "16"])
    assert resumed.result.returncode == 0, resumed.explain()
    assert f"resumed from {checkpoint.path} at step {step}" in resumed.output(0)
    two, one = _metrics(out), _metrics(one_process)
    assert [m["step"] for m in two] == list(range(1, STEPS + 1))
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a["step"], a["loss"], b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)  # clipping saw the whole gradient
        assert a["tokens"] == b["tokens"]
    assert len({round(m["loss"], 6) for m in one}) > 1
    assert_same_training(_adapter(out), _adapter(one_process), lr=2e-4)


def test_full_fine_tune_with_accumulation_matches_one_process(tiny_model_dir, tmp_path):
    """--method full, 2 micro-batches a step: every weight sharded, gradients reduce-scattered per micro-batch and
    summed; final/ is the gathered model, the tied head written once, as one process writes it. Slow (30-45 s): a 2-rank
    FSDP full fine-tune and a 1-process reference run, compared tensor by tensor."""
    from safetensors.torch import load_file

    flags = ["--method", "full", "--grad-accum", "2", "--max-steps", "2"]
    launch = Launch(tmp_path, _train_flags(tiny_model_dir, tmp_path / "two", "--batch-size", "2",
                                           "--distributed", "fsdp", *flags))
    assert launch.result.returncode == 0, launch.explain()
    single = subprocess.run([sys.executable, "-m", "memfit",
                             *_train_flags(tiny_model_dir, tmp_path / "one", "--batch-size", "4", *flags)],
                            capture_output=True, text=True, timeout=300, env=_env())
    assert single.returncode == 0, single.stderr
    for a, b in zip(_metrics(tmp_path / "two"), _metrics(tmp_path / "one")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_accum"] == b["grad_accum"] == 2
    assert_same_training(load_file(str(tmp_path / "two" / "final" / "model.safetensors")),
                         load_file(str(tmp_path / "one" / "final" / "model.safetensors")), lr=2e-4,
                         initial=load_file(str(tiny_model_dir / "model.safetensors")))


def test_oom_on_one_rank_exits_4_and_the_launcher_ends_the_run(tiny_model_dir, tmp_path):
    """FSDP's forward holds collectives: an OOM on rank 1 is not recovered in the process; rank 1 exits 4 with one
    line, torchrun ends rank 0, and the periodic checkpoint before it stays resumable."""
    out = tmp_path / "run"
    launch = Launch(tmp_path, _train_flags(tiny_model_dir, out, "--batch-size", "2", "--max-steps", "4",
                                           "--distributed", "fsdp", "--save-every", "1"), faults="oom@3:rank1")
    codes = launch.exit_codes()
    assert codes.get(1) == 4, launch.explain()
    assert codes.get(0) != 0  # ended by the launcher (a signal, or gloo's closed connection)
    line = launch.output(1, "stderr").strip().splitlines()[-1]
    assert "out of memory on rank 1 at step 3" in line and "--distributed fsdp" in line
    assert open_checkpoint(out).step == 2


def test_deepspeed_is_refused_on_cpu_in_one_line(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "memfit", *_train_flags(tiny_model_dir, out, "--distributed", "zero2")],
                            capture_output=True, text=True, timeout=120, env=_env(WORLD_SIZE="2", RANK="0"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "trains on CUDA GPUs only, not on cpu" in result.stderr, result.stderr
    assert not out.exists()


# --- pure pieces ----------------------------------------------------------------------------------------------


def test_engine_checks_for_fsdp_on_cpu_processes():
    engines.check_combination(TrainConfig(distributed="fsdp"), "cpu", 2)  # allowed: memfit shards over gloo
    with pytest.raises(UserError, match="--offload cpu on CPU processes"):
        engines.check_combination(TrainConfig(distributed="fsdp", offload="cpu"), "cpu", 2)
    with pytest.raises(UserError, match="--dtype fp16 with --distributed fsdp"):
        engines.check_combination(TrainConfig(distributed="fsdp", dtype="fp16"), "cuda", 2)
    with pytest.raises(UserError, match="not mps"):
        engines.check_combination(TrainConfig(distributed="fsdp"), "mps", 2)
    for stage in ("zero1", "zero2", "zero3"):
        with pytest.raises(UserError, match="trains on CUDA GPUs only, not on cpu"):
            engines.check_combination(TrainConfig(distributed=stage), "cpu", 1)


def test_decoder_layers_found_inside_the_peft_model(tiny_model_dir):
    from memfit.distributed.fsdp import decoder_layer_names, trainable_names
    from memfit.precision import resolve_precision
    from memfit.train.model import load_model

    config = TrainConfig()
    model = load_model(Path(tiny_model_dir), config, resolve_precision("fp32", "cpu"))
    names = decoder_layer_names(model)
    assert names == {"LlamaDecoderLayer"}
    assert sum(type(module).__name__ in names for module in model.modules()) == 4
    assert trainable_names(model) and all("lora_" in name for name in trainable_names(model))


def test_qlora_storage_follows_the_engine_in_the_4bit_config():
    from memfit.precision import resolve_precision
    from memfit.train.model import quantization_config

    bf16 = resolve_precision("bf16", "cuda")
    sharded = quantization_config(TrainConfig(method="qlora", distributed="fsdp"), bf16)
    assert sharded.bnb_4bit_quant_storage == torch.bfloat16
    assert quantization_config(TrainConfig(method="qlora", distributed="zero2"), bf16).bnb_4bit_quant_storage \
        == torch.uint8


def test_deepspeed_micro_steps_mark_the_boundary_and_keep_memfit_weights(monkeypatch):
    """accelerate 1.15's real DeepSpeed backward with a stand-in engine (DeepSpeed cannot train on CPU): the
    boundary is set on the last micro-batch only, where the engine steps; the loss is not divided by the
    accumulation steps (memfit's token weights already sum to 1 over the step)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper

    from memfit.distributed.deepspeed import DeepSpeedEngine
    from memfit.distributed.ranks import Ranks

    class Engine:
        def __init__(self):
            self.calls = []

        def set_gradient_accumulation_boundary(self, is_boundary):
            self.calls.append(("boundary", is_boundary))

        def backward(self, loss, **kwargs):
            self.calls.append(("backward", kwargs))
            loss.backward()

        def step(self):
            self.calls.append(("step",))

    accelerator = Accelerator(cpu=True)
    monkeypatch.setattr(accelerator.state, "distributed_type", DistributedType.DEEPSPEED)
    engine = Engine()
    monkeypatch.setattr(accelerator, "deepspeed_engine_wrapped", DeepSpeedEngineWrapper(engine), raising=False)
    weight = torch.nn.Parameter(torch.ones(()))
    deepspeed = DeepSpeedEngine(TrainConfig(distributed="zero2"), Ranks(), "cpu")
    deepspeed.accelerator = accelerator
    for number in range(3):
        deepspeed.forward_backward(lambda model: weight * torch.tensor(2.0), last=number == 2)
    backward = ("backward", {"scale_wrt_gas": False})
    assert engine.calls == [("boundary", False), backward, ("boundary", False), backward, ("boundary", True),
                            backward, ("step",)]
    assert weight.grad.item() == 6.0
    assert accelerator.sync_gradients  # restored for whatever runs next
