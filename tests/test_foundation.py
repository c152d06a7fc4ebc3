"""Config validation, system detection, the allocator setting, the signal handlers of a run, the trainer's layer."""

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from memfit import allocator
from memfit.allocator import fix_mmap_threshold
from memfit.config import TrainConfig, load_yaml, make_config
from memfit.errors import UserError
from memfit.precision import resolve_precision
from memfit.runtime import signals_handled, stop_then_abort
from memfit.system import detect


def test_config_defaults_and_qlora_implies_4bit():
    config = make_config(method="qlora")
    assert config.quant == "4" and config.effective_lora_alpha == 2 * config.lora_rank
    assert make_config(method="qlora", quant="8").quant == "8"


@pytest.mark.parametrize("values", [dict(batch_size=0), dict(method="full", quant="4"), dict(distrust_alpha=5.0),
                                    dict(memory_threshold=1.5), dict(max_memory=-1)])
def test_config_rejects(values):
    with pytest.raises(UserError):
        make_config(**values)


def test_every_field_has_help():
    assert all(field.description for field in TrainConfig.model_fields.values())


def test_yaml_keys_accept_dashes(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora-rank: 8\nseq_len: 64\n")
    assert load_yaml(path) == {"lora_rank": 8, "seq_len": 64}


def test_precision_contract():
    assert resolve_precision("auto", "cpu").name == "fp32"
    mixed = resolve_precision("bf16", "cpu")
    assert mixed.autocast and mixed.trainable_bytes == 4 and mixed.frozen_bytes == 2
    pure = resolve_precision("bf16-pure", "cpu")
    assert not pure.autocast and pure.trainable_bytes == 2
    with pytest.raises(UserError):
        resolve_precision("fp16", "cpu")


def test_system_detects_memory():
    info = detect()
    assert info.ram_total_bytes >= info.ram_available_bytes > 0
    assert info.suggested_limit_bytes == int(info.ram_available_bytes * 0.8)
    assert info.device_memory_bytes("cpu") == info.suggested_limit_bytes
    assert info.cpu_count >= 1


def test_mmap_threshold_is_settable_on_linux():
    assert fix_mmap_threshold() == sys.platform.startswith("linux")


def test_allocator_policy_comes_from_the_environment_and_a_bad_one_is_one_line(monkeypatch):
    monkeypatch.delenv(allocator.POLICY_ENV, raising=False)
    assert allocator.configure().policy == allocator.DEFAULT_POLICY == "threshold"
    monkeypatch.setenv(allocator.POLICY_ENV, "trim")
    assert allocator.configure().policy == "trim"
    assert allocator.configure("none").policy == "none"  # an explicit policy wins over the environment
    monkeypatch.setenv(allocator.POLICY_ENV, "jemalloc")
    with pytest.raises(UserError, match="MEMFIT_MALLOC='jemalloc' is not an allocator policy"):
        allocator.configure()


# A fresh process per policy (mallopt holds for the whole process): one "step" allocates 64 blocks of 4 MiB, touched,
# each followed by a small tensor that stays live (as a step's saved tensors do: the freed blocks are holes, not the
# heap's top, which glibc trims on its own), then frees the blocks; prints RSS in MB with the blocks live, after the
# frees, and after step_end.
_STEP = """
import sys, torch
from memfit import allocator
from memfit.guard.sampler import read_memory
a = allocator.configure(sys.argv[1])
kept = []
for _ in range(2):  # the second step is the one measured: glibc's dynamic threshold has moved by then
    blocks = []
    for _ in range(64):
        blocks.append(torch.ones(1024 * 1024))
        kept.append(torch.ones(1024))
    live = read_memory().rss_bytes
    del blocks
    freed = read_memory().rss_bytes
    a.step_end()
    ended = read_memory().rss_bytes
print(live >> 20, freed >> 20, ended >> 20, a.effective)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the policies are glibc's")
@pytest.mark.parametrize("policy", allocator.POLICIES)
def test_each_allocator_policy_gives_memory_back_where_it_says(policy):
    done = subprocess.run([sys.executable, "-c", _STEP, policy], capture_output=True, text=True, check=True)
    live, freed, ended, effective = done.stdout.split()
    live, freed, ended = int(live), int(freed), int(ended)
    assert effective == "True"
    # What each policy promises, not where glibc happens to put the blocks: under the dynamic threshold ("trim",
    # "none") the freed blocks are holes in the heap or its top, which glibc trims by itself, and which of the two
    # depends on where earlier small allocations landed (importing one module more moved it).
    if policy == "threshold":  # each 4 MiB block is its own mmap: gone at the free
        assert live - freed >= 200
    elif policy == "trim":  # given back by the step end at the latest
        assert live - ended >= 200
    else:  # "none": memfit gives nothing back at the step end
        assert abs(freed - ended) < 50


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_handled_runs_its_handler_then_puts_the_one_before_back(signum):
    received = []

    def before(number, frame):
        received.append(("before", number))

    def during(number, frame):
        received.append(("during", number))

    outer = signal.signal(signum, before)
    try:
        with signals_handled(during):
            assert signal.getsignal(signum) is during
            os.kill(os.getpid(), signum)  # a real signal, handled by the block's handler
        assert signal.getsignal(signum) is before
        os.kill(os.getpid(), signum)  # after the block: the handler from before it again
        assert received == [("during", signum), ("before", signum)]
        with pytest.raises(RuntimeError):  # put back also when the block raises
            with signals_handled(during):
                raise RuntimeError("the run failed")
        assert signal.getsignal(signum) is before
    finally:
        signal.signal(signum, outer)


def test_a_first_signal_asks_to_stop_a_second_aborts_unless_it_is_a_repeat():
    class Run:
        interrupted = None

    run, repeats = Run(), []
    with signals_handled(stop_then_abort(run)):
        os.kill(os.getpid(), signal.SIGTERM)  # real signals: the first only marks the run
        assert run.interrupted == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    patient = Run()
    with signals_handled(stop_then_abort(patient, lambda seconds: repeats.append(seconds) or True)):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # judged a repeat of the first: not an abort
    assert patient.interrupted == "SIGINT" and len(repeats) == 1 and 0 <= repeats[0] < 5


def test_the_trainer_never_imports_the_estimator():
    """The estimator builds its model with memfit.train.model, so train/ sits below it: the trainer is handed the
    estimator's answers (memfit.sizing) by whoever starts it, and imports nothing of memfit.estimate itself."""
    import memfit.train

    upward = []
    for path in sorted(Path(memfit.train.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            upward += [f"{path.name}: {name}" for name in names if name.split(".")[:2] == ["memfit", "estimate"]]
    assert upward == []
