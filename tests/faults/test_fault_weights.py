"""Damaged model weights: a cut-short, empty or garbled `model.safetensors`, a sharded checkpoint with a shard missing
or not holding what its index says. `memfit train`, `probe` and `eval` answer each with one line on stderr naming the
file and how to get it again, exit 2, no traceback, before the model loads, and nothing written: no run dir that
would block the rerun, an earlier run's checkpoints untouched.

Every damaged copy is made once (the tiny model of conftest, copied, then damaged); the check reads headers and file
sizes only, so no case loads a model. `train` and `probe` run as real processes once, side by side (each process
spends its seconds importing torch); every case goes through the same `memfit.cli.main` in this process."""

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from memfit.cli import main
from memfit.errors import WeightsDamagedError
from memfit.models import resolve_model

from .conftest import DEMO_DATA, env, train_command

SHARD_BYTES = "1MB"  # the tiny model (4.2 MB in fp32) in five shards


def _header_end(path: Path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def _truncate(path: Path) -> None:
    """Cut in the middle of the tensor data (the header stays whole: only the sizes tell)."""
    start, size = _header_end(path), path.stat().st_size
    os.truncate(path, start + (size - start) // 2)


def _empty(path: Path) -> None:
    os.truncate(path, 0)


def _garbage_start(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:16] = b"\xde\xad\xbe\xef" * 4
    path.write_bytes(bytes(data))


def _header_past_eof(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", len(data) + 1000)
    path.write_bytes(bytes(data))


def _header_bad_json(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:12] = b"{{{{"
    path.write_bytes(bytes(data))


SINGLE_FILE_DAMAGE = {"truncated": _truncate, "empty": _empty, "garbage-start": _garbage_start,
                      "header-past-eof": _header_past_eof, "header-bad-json": _header_bad_json}


@pytest.fixture(scope="module")
def sharded_model(tiny_model_dir, tmp_path_factory):
    """The tiny model re-saved by transformers in shards: model.safetensors.index.json + model-0000N-of-0000M."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("weights") / "sharded"
    shutil.copytree(tiny_model_dir, out)
    (out / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).save_pretrained(out, max_shard_size=SHARD_BYTES)
    shards = sorted(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert len(shards) >= 3, shards
    return out


@pytest.fixture(scope="module")
def damaged(tiny_model_dir, sharded_model, tmp_path_factory):
    """case -> (model dir, the file the error must name). One damaged copy per case, shared by the module."""
    root = tmp_path_factory.mktemp("damaged")
    cases = {}
    for name, damage in SINGLE_FILE_DAMAGE.items():
        model = shutil.copytree(tiny_model_dir, root / name)
        damage(model / "model.safetensors")
        cases[name] = (model, model / "model.safetensors")
    index_name = "model.safetensors.index.json"
    model = shutil.copytree(sharded_model, root / "shard-missing")
    shards = sorted(set(json.loads((model / index_name).read_text())["weight_map"].values()))
    (model / shards[1]).unlink()
    cases["shard-missing"] = (model, model / index_name)
    # The index maps a tensor to a shard that does not hold it (transformers would load it as random init).
    model = shutil.copytree(sharded_model, root / "shard-lacks-tensor")
    index = json.loads((model / index_name).read_text())
    moved = next(name for name, shard in index["weight_map"].items() if shard == shards[0])
    index["weight_map"][moved] = shards[1]
    (model / index_name).write_text(json.dumps(index))
    cases["shard-lacks-tensor"] = (model, model / shards[1])
    return cases


CASES = [*SINGLE_FILE_DAMAGE, "shard-missing", "shard-lacks-tensor"]


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def _tree(path: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under `path`: size, mtime and content hash (what a rerun must leave as it was)."""
    return {str(file.relative_to(path)): (file.stat().st_size, file.stat().st_mtime_ns,
                                          hashlib.sha256(file.read_bytes()).hexdigest())
            for file in sorted(path.rglob("*")) if file.is_file()}


# --- the check before loading --------------------------------------------------------------------------------------


def test_whole_weights_pass_the_check(tiny_model_dir, sharded_model):
    assert resolve_model(str(tiny_model_dir)).require_weights() == tiny_model_dir
    assert resolve_model(str(sharded_model)).require_weights() == sharded_model


@pytest.mark.parametrize("case", CASES)
def test_every_damage_is_one_line_naming_the_file_and_the_command_that_remakes_it(damaged, case):
    model, file = damaged[case]
    with pytest.raises(WeightsDamagedError) as error:
        resolve_model(str(model)).require_weights()
    line = error.value.one_line()
    assert "\n" not in line and str(file) in line, line
    assert f"memfit init-model --preset tiny --out {model}" in line  # the marker file says how it was made


def test_the_hint_names_the_download_for_the_hf_cache_and_git_lfs_pull_for_a_pointer(tiny_model_dir, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = tmp_path / "hub" / "models--acme--widget-1b" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (snapshot / "memfit-init.json").unlink()
    _truncate(snapshot / "model.safetensors")
    with pytest.raises(WeightsDamagedError) as error:
        resolve_model("acme/widget-1b").require_weights()
    assert "download acme/widget-1b --force-download" in error.value.one_line()

    local = shutil.copytree(snapshot, tmp_path / "cloned")
    (local / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")
    with pytest.raises(WeightsDamagedError) as error:
        resolve_model(str(local)).require_weights()
    line = error.value.one_line()
    assert "Git LFS pointer" in line and f"`git lfs pull` in {local}" in line and "--local-dir" in line


# --- the CLI: real processes, then every case ----------------------------------------------------------------------


def test_train_and_probe_as_real_processes_answer_damaged_weights_with_one_line_and_exit_2(damaged, tmp_path):
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    commands = {
        "train": (train_command(damaged["truncated"][0], run_dir, "--max-steps", "2"), damaged["truncated"][1]),
        "probe": ([sys.executable, "-m", "memfit", "probe", "--model", str(damaged["shard-missing"][0]),
                   "--data", DEMO_DATA, "--device", "cpu", "--steps", "2"], damaged["shard-missing"][1]),
    }
    # Side by side: each process spends nearly all its time importing torch and transformers.
    processes = {name: subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**env(), "MEMFIT_CACHE": str(cache)})
                 for name, (command, _) in commands.items()}
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 2, (name, stderr[-2000:])
        line = _one_line(stderr)
        assert line.startswith("memfit: error: ") and str(commands[name][1]) in line, (name, line)
        assert "trial" not in line, line  # the probe stops before any trial, not with a trial's failure
    assert not run_dir.exists()
    assert not (cache / "probe").exists()  # no journal, no profile


@pytest.mark.parametrize("case", CASES)
def test_memfit_train_answers_each_damage_with_one_line_exit_2_and_no_run_dir(damaged, case, tmp_path, capsys):
    model, file = damaged[case]
    out = tmp_path / "run"
    code = main(train_command(model, out, "--max-steps", "2")[3:])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert str(file) in _one_line(stderr)
    assert not out.exists()  # nothing that would block the rerun


def test_memfit_train_supervise_checks_before_the_supervisor_writes_anything(damaged, tmp_path, capsys):
    model, file = damaged["header-past-eof"]
    out = tmp_path / "run"
    assert main(train_command(model, out, "--max-steps", "2", "--supervise")[3:]) == 2  # no child started
    assert str(file) in _one_line(capsys.readouterr().err)
    assert not out.exists()  # no supervisor.jsonl, no run.json to block the rerun


@pytest.mark.parametrize("command,case", [("probe", "truncated"), ("probe", "shard-lacks-tensor"),
                                          ("eval", "empty"), ("eval", "header-bad-json"),
                                          ("eval", "shard-missing")])
def test_memfit_probe_and_eval_answer_damage_with_one_line_exit_2_and_nothing_written(damaged, command, case,
                                                                                     tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path / "cache"))
    model, file = damaged[case]
    extra = ["--out", str(tmp_path / "eval.jsonl")] if command == "eval" else []
    code = main([command, "--model", str(model), "--data", DEMO_DATA, "--device", "cpu", *extra])
    stderr = capsys.readouterr().err
    assert code == 2 and str(file) in _one_line(stderr), stderr
    assert not (tmp_path / "cache" / "probe").exists() and not (tmp_path / "eval.jsonl").exists()


def test_memfit_eval_answers_a_damaged_adapter_with_one_line_before_loading(tiny_model_dir, tmp_path, capsys):
    adapter = tmp_path / "run" / "final"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}\n')
    (adapter / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")  # a header cut short
    code = main(["eval", "--model", str(tiny_model_dir), "--adapter", str(adapter.parent), "--data", DEMO_DATA,
                 "--device", "cpu"])
    stderr = capsys.readouterr().err
    assert code == 2 and str(adapter / "adapter_model.safetensors") in _one_line(stderr), stderr


def test_a_resume_on_damaged_weights_leaves_the_run_as_it_was(damaged, tmp_path, capsys):
    import torch

    from memfit.config import TrainConfig
    from memfit.train.checkpoint import save_checkpoint

    model_dir, file = damaged["truncated"]
    out = tmp_path / "run"
    # An earlier run's checkpoint (written as the loop writes one; its tensors need not be the model's here).
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    config = TrainConfig(seq_len=64, batch_size=4, max_steps=4)
    meta = {"config": config.model_dump(), "model": str(model_dir), "model_path": str(model_dir),
            "data": DEMO_DATA, "output_dir": str(out), "world_size": 1}
    save_checkpoint(out, 2, model=layer, optimizer=optimizer, scheduler=scheduler, keep=3, meta=meta,
                    trainer_state={"step": 2, "samples_seen": 8})
    (out / "run.json").write_text('{"status": "guard_stop"}\n')
    (out / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    before = _tree(out)
    assert main(["train", "--resume", "--output-dir", str(out), "--device", "cpu"]) == 2
    assert str(file) in _one_line(capsys.readouterr().err)
    assert _tree(out) == before


# --- what gets past the check: the loader's own errors, and a probe trial's child ---------------------------------


def test_a_damaged_file_met_while_loading_is_the_same_one_line(damaged, monkeypatch):
    from memfit.config import TrainConfig
    from memfit.eval.evaluate import load_for_eval
    from memfit.models import resolve as resolve_module
    from memfit.precision import resolve_precision
    from memfit.train.model import load_model

    model, file = damaged["truncated"]
    precision = resolve_precision("fp32", "cpu")
    with pytest.raises(WeightsDamagedError, match="truncated") as error:  # the check names it even here
        load_model(model, TrainConfig(), precision)
    assert str(file) in error.value.one_line()
    # Without the check, the library's own error (SafetensorError) is still one line naming the model.
    monkeypatch.setattr(resolve_module, "weights_problem", lambda directory: None)
    for load in (lambda: load_model(model, TrainConfig(), precision), lambda: load_for_eval(model, None, precision,
                                                                                             "cpu")):
        with pytest.raises(WeightsDamagedError, match="SafetensorError") as error:
            load()
        assert str(model) in error.value.one_line() and "\n" not in error.value.one_line()
    shard_missing, _ = damaged["shard-missing"]
    with pytest.raises(WeightsDamagedError, match="FileNotFoundError"):
        load_model(shard_missing, TrainConfig(), precision)
    # Anything else keeps its own handling: out of memory is not a damaged file.
    assert resolve_module.weights_load_error(RuntimeError("CUDA out of memory"), model) is None
    assert resolve_module.weights_load_error(ImportError("no bitsandbytes"), model) is None


def test_a_probe_trial_that_meets_damaged_weights_ends_the_probe_with_the_childs_line(damaged, tiny_model_dir,
                                                                                     tmp_path, monkeypatch, capsys):
    from memfit.config import TrainConfig
    from memfit.probe import ProbeJob, probe
    from memfit.probe import runner as probe_runner
    from memfit.child import trial as child_main
    from memfit.probe.trial import Trial, child_error

    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path / "cache"))
    model, file = damaged["truncated"]

    def damaged_child(spec, trial_dir, *, steps, timeout_s, on_step=None, check_interrupted=None):
        # The real child, in this process, on the damaged copy (the parent checked the whole one).
        trial_dir.mkdir(parents=True)
        spec_path = trial_dir / "spec.json"
        spec_path.write_text(json.dumps({**spec.__dict__, "model": str(model)}))
        code = child_main(str(spec_path), str(trial_dir / "run"))
        line = capsys.readouterr().err.strip().removeprefix("memfit: error: ")
        (trial_dir / "stderr.txt").write_text(line)
        assert code == 2 and child_error(trial_dir)["weights_damaged"]
        settings = {key: spec.config[key] for key in ("batch_size", "lora_rank", "seq_len")}
        return Trial(settings, "error", line, steps, 0, None, "peak_rss", exit_code=code)

    monkeypatch.setattr(probe_runner, "run_trial", damaged_child)
    monkeypatch.setattr(probe_runner.Probe, "estimate", lambda self, settings: None)  # (seconds of tracing)
    monkeypatch.setattr(probe_runner.Probe, "first_guess", lambda self, axis: 1)
    job = ProbeJob(model=str(tiny_model_dir), data=Path(DEMO_DATA), device="cpu", max_memory=0.7, steps=2)
    with pytest.raises(WeightsDamagedError) as error:
        probe(job, TrainConfig(seq_len=64))
    line = error.value.one_line()
    assert line.startswith("damaged model weights: ") and str(file) in line and "trial" not in line
