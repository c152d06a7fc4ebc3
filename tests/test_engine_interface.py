"""The seam between the training loop and the way a step runs (memfit.distributed.engine): the loop goes through
the Engine interface only, so a fake engine (plain torch, no accelerate, no process group) trains the tiny model to
the same losses as the one-process engine; its failures take the loop's recovery path; the interface holds no
torch type, and the engine is picked once from the config and the launcher."""

import inspect
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import memfit.train.loop as loop
from memfit.config import TrainConfig
from memfit.distributed.deepspeed import DeepSpeedEngine
from memfit.distributed.ddp import DdpEngine
from memfit.distributed.engine import Engine, pick_engine
from memfit.distributed.fsdp import FsdpEngine
from memfit.distributed.ranks import Ranks
from memfit.distributed.single import OneProcessEngine
from memfit.train import TrainJob, train
from memfit.events import OomRecovered, StepEnd
from test_train import DEMO_DATA, FAST


class FakeEngine(Engine):
    """One process in plain torch: what the interface asks, and a log of the calls."""

    name = "fake"

    def __init__(self, config, ranks, device, fail_above: int | None = None):
        super().__init__(config, ranks, device)
        self.calls: list = []
        self.fail_above = fail_above  # an out-of-memory error in micro-batches of more rows than this

    def start(self, precision) -> None:
        self.calls.append("start")
        random.seed(self.config.seed)
        np.random.seed(self.config.seed)
        torch.manual_seed(self.config.seed)

    def shard(self, model):
        self.calls.append("shard")
        return "fake: nothing sharded"

    def prepare(self, model, optimizer) -> None:
        self.calls.append("prepare")
        self.model, self.optimizer = model, optimizer

    def forward_backward(self, loss_of, last: bool):
        seen = {}

        def model(**inputs):  # the engine's model, as the loop's loss sees it: it runs the micro-batch
            seen["rows"] = len(inputs["input_ids"])
            if self.fail_above is not None and seen["rows"] > self.fail_above:
                raise torch.OutOfMemoryError("fake: out of memory")
            return self.model(**inputs)

        try:
            loss = loss_of(model)
        finally:
            self.calls.append(("forward_backward", last, seen.get("rows")))
        loss.backward()
        return loss

    def end_step(self, loss_sum, failure, agree) -> None:
        self.calls.append(("end_step", failure))

    def clip(self, max_norm: float):
        self.calls.append("clip")
        return torch.nn.utils.clip_grad_norm_(self.trainable(), max_norm)

    def optimizer_step(self) -> None:
        self.calls.append("optimizer_step")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def drop_gradients(self) -> None:
        self.calls.append("drop_gradients")
        self.optimizer.zero_grad(set_to_none=True)

    def checkpoint_files(self, engine_dir: Path) -> dict:
        self.calls.append("checkpoint_files")
        return {}

    def final_state(self):
        self.calls.append("final_state")
        return None

    def eval_share(self, rows, micro_batch):
        self.calls.append("eval_share")
        return rows, None


def _with_fake(monkeypatch, **kwargs) -> list[FakeEngine]:
    made = []

    def pick(config, ranks, device):
        made.append(FakeEngine(config, ranks, device, **kwargs))
        return made[-1]

    monkeypatch.setattr(loop, "pick_engine", pick)
    return made


def _run(model_dir, out, events, **overrides):
    config = TrainConfig(**{**FAST, "max_steps": 3, "grad_accum": 2, "batch_size": 2, **overrides})
    job = TrainJob(model=str(model_dir), data=DEMO_DATA, output_dir=out, device="cpu", val_data=DEMO_DATA)
    return train(job, config, on_event=events.append)


def test_a_fake_engine_trains_as_the_one_process_engine_does(tiny_model_dir, tmp_path, monkeypatch):
    real: list = []
    assert _run(tiny_model_dir, tmp_path / "real", real).exit_code == 0
    made = _with_fake(monkeypatch)
    fake: list = []
    result = _run(tiny_model_dir, tmp_path / "fake", fake)
    assert result.exit_code == 0 and (tmp_path / "fake" / "final").is_dir()
    losses = {name: [event.loss for event in events if isinstance(event, StepEnd)]
              for name, events in (("real", real), ("fake", fake))}
    assert len(losses["fake"]) == 3
    assert losses["fake"] == pytest.approx(losses["real"], rel=1e-5)

    calls = made[0].calls
    assert calls[:3] == ["start", "shard", "prepare"]
    steps = [call for call in calls if call in ("clip", "optimizer_step") or
             (isinstance(call, tuple) and call[0] in ("forward_backward", "end_step"))]
    one_step = [("forward_backward", False, 2), ("forward_backward", True, 2), ("end_step", None), "clip",
                "optimizer_step"]
    assert steps == one_step * 3  # two micro-batches a step, the last one marked; the step end once
    assert calls.count("checkpoint_files") == 1 and calls.count("final_state") == 1  # the end's checkpoint, final/
    assert calls.count("eval_share") == 1  # the end's evaluation
    assert "drop_gradients" not in calls


def test_a_fake_engines_out_of_memory_takes_the_loops_recovery(tiny_model_dir, tmp_path, monkeypatch):
    """The engine runs out of memory on micro-batches of 2 rows: the loop drops the gradients, halves the
    micro-batch and retries the same rows (the engine's calls show it), and the run finishes."""
    made = _with_fake(monkeypatch, fail_above=1)
    events: list = []
    config = TrainConfig(**{**FAST, "max_steps": 2, "grad_accum": 1, "batch_size": 2})
    result = train(TrainJob(str(tiny_model_dir), DEMO_DATA, tmp_path / "oom", device="cpu"), config, events.append)
    assert result.exit_code == 0 and result.oom_recoveries == 1
    recovered = [event for event in events if isinstance(event, OomRecovered)]
    assert len(recovered) == 1 and recovered[0].micro_batch == 1
    calls = made[0].calls
    failed = calls.index(("forward_backward", True, 2))
    assert calls[failed + 1] == "drop_gradients"  # the failed step's gradients go before the retry
    after = [call for call in calls[failed + 1:] if isinstance(call, tuple) and call[0] == "forward_backward"]
    assert after == [("forward_backward", False, 1), ("forward_backward", True, 1)] * 2  # the same rows, halved
    assert [step.micro_batch for step in events if isinstance(step, StepEnd)] == [1, 1]


@pytest.mark.parametrize("distributed, world, expected", [
    ("auto", 1, OneProcessEngine), ("fsdp", 1, OneProcessEngine), ("ddp", 1, OneProcessEngine),
    ("auto", 2, DdpEngine), ("ddp", 2, DdpEngine), ("fsdp", 2, FsdpEngine),
    ("zero2", 1, DeepSpeedEngine), ("zero3", 2, DeepSpeedEngine),
])
def test_the_engine_is_picked_from_the_config_and_the_launcher(distributed, world, expected):
    engine = pick_engine(TrainConfig(distributed=distributed), Ranks(0, world, 0, world), "cpu")
    assert type(engine) is expected
    assert engine.distributed is (world > 1)
    # One rank alone may leave a forward pass (the guard's stop at layer entries) only without collectives in it.
    assert engine.stops_inside_forward is (expected is OneProcessEngine)
    assert engine.per_rank_checkpoint is (expected is DeepSpeedEngine)


def test_the_interface_holds_no_torch_type():
    """An engine without torch (MLX's) implements the same methods: nothing in their signatures names torch, and
    the interface's module imports none of it."""
    for name, method in inspect.getmembers(Engine, inspect.isfunction):
        signature = str(inspect.signature(method))
        assert "torch" not in signature and "Tensor" not in signature, (name, signature)
    code = "import sys, memfit.distributed.engine; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_every_engine_implements_the_interface():
    """What the base leaves abstract, every torch engine provides (a missing method would fail mid-run)."""
    abstract = [name for name, method in inspect.getmembers(Engine, inspect.isfunction)
                if "raise NotImplementedError" in inspect.getsource(method)]
    assert set(abstract) >= {"start", "prepare", "forward_backward", "clip", "optimizer_step", "drop_gradients"}
    for engine in (OneProcessEngine, DdpEngine, FsdpEngine, DeepSpeedEngine):
        for name in abstract:
            assert getattr(engine, name) is not getattr(Engine, name), (engine.__name__, name)
