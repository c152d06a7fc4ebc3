"""The library API a notebook uses: memfit.estimate / probe / train on the built-in tiny model, their typed results,
the same numbers the CLI prints (it calls exactly these), and `import memfit` staying cheap."""

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

import memfit
from memfit.cli import main
from memfit.events import Notice, RunEnded
from memfit.units import MB

DEMO_DATA = Path(str(resources.files("memfit").joinpath("data/demo.jsonl")))
FAST = dict(seq_len=64, batch_size=4, lr=1e-2, warmup_steps=1, memory_sample_interval=0.05)


def test_importing_memfit_loads_no_torch_and_the_three_calls_are_callable():
    code = ("import sys, memfit\n"
            "calls = [memfit.estimate, memfit.probe, memfit.train]\n"
            "assert all(callable(call) for call in calls)\n"
            "import memfit.train.loop  # the package stays callable once its modules are imported\n"
            "assert callable(memfit.train) and memfit.train.TrainJob is memfit.train.loop.TrainJob\n"
            "print('torch' in sys.modules)\n")
    cheap = subprocess.run([sys.executable, "-c", "import sys, memfit; memfit.estimate, memfit.probe, memfit.train; "
                            "print('torch' in sys.modules)"], capture_output=True, text=True, check=True)
    assert cheap.stdout.strip() == "False"
    full = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    import inspect

    assert "batch_size" not in inspect.signature(memfit.estimate).parameters  # the options go through **options
    assert {"model", "device", "memory_gb", "target_batch"} <= set(inspect.signature(memfit.estimate).parameters)


def test_estimate_returns_the_breakdown_the_cli_prints(tiny_model_dir, capsys):
    found = memfit.estimate(str(tiny_model_dir), device="cpu", memory_gb=2, seq_len=128, batch_size=4)
    assert isinstance(found, memfit.EstimateResult)
    assert found.fits and found.total_bytes == found.estimate.total_bytes > 0
    assert found.largest_batch >= 4 and (found.micro_batch, found.grad_accum) == (4, 1) and not found.advice
    assert found.model.path == tiny_model_dir and found.estimate.notes[0].startswith("model config:")
    assert main(["estimate", "--model", str(tiny_model_dir), "--device", "cpu", "--memory-gb", "2", "--seq-len",
                 "128", "--batch-size", "4", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["total_bytes"] == found.total_bytes and printed["max_batch_size"] == found.largest_batch
    # A target batch: the largest micro-batch that fits, accumulation for the rest.
    target = memfit.estimate(str(tiny_model_dir), device="cpu", memory_gb=2, seq_len=128, target_batch=3)
    assert (target.micro_batch, target.grad_accum, target.target_batch) == (3, 1, 3)


def test_estimate_options_beat_the_config_file_and_bad_input_is_a_user_error(tiny_model_dir, tmp_path):
    from memfit.errors import UserError

    config_file = tmp_path / "c.yaml"
    config_file.write_text(f"model: {tiny_model_dir}\nseq_len: 256\nbatch_size: 2\n")
    from_file = memfit.estimate(device="cpu", memory_gb=2, config_file=config_file)
    assert (from_file.estimate.config.seq_len, from_file.estimate.config.batch_size) == (256, 2)
    given = memfit.estimate(device="cpu", memory_gb=2, config_file=config_file, seq_len=64)
    assert (given.estimate.config.seq_len, given.estimate.config.batch_size) == (64, 2)
    with pytest.raises(UserError, match="unknown --device"):
        memfit.estimate(str(tiny_model_dir), device="tpu")
    with pytest.raises(UserError, match="missing --model"):
        memfit.estimate(device="cpu")


def test_train_returns_how_the_run_ended_with_its_report_and_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    events = []
    run = memfit.train(str(tiny_model_dir), DEMO_DATA, out, device="cpu", max_steps=2, on_event=events.append,
                       **FAST)
    assert isinstance(run, memfit.TrainRun)
    assert (run.ok, run.exit_code, run.status, run.output_dir) == (True, 0, "done", out)
    assert isinstance(run.result, RunEnded) and run.result.step == 2
    assert run.final_dir == out / "final" and (run.final_dir / "adapter_config.json").exists()
    assert (out / "report.html").exists()
    assert f"run report: {out / 'report.html'}" in [e.message for e in events if isinstance(e, Notice)]
    assert json.loads((out / "run.json").read_text())["config"]["lr"] == FAST["lr"]
    # resume=True: the newest checkpoint of output_dir; its model, data and config are the defaults.
    resumed = memfit.train(output_dir=out, resume=True, max_steps=3, force=True)  # a longer run: not exact
    assert (resumed.exit_code, resumed.status, resumed.result.step) == (0, "done", 3)


def test_train_checks_before_anything_is_written(tiny_model_dir, tmp_path):
    from memfit.errors import UserError

    out = tmp_path / "run"
    with pytest.raises(UserError, match="missing --data"):
        memfit.train(str(tiny_model_dir), output_dir=out)
    with pytest.raises(UserError, match="--eval-every needs --val-data"):
        memfit.train(str(tiny_model_dir), DEMO_DATA, out, eval_every=2)
    with pytest.raises(UserError, match="--reload-interval needs --supervise"):
        memfit.train(str(tiny_model_dir), DEMO_DATA, out, reload_interval=2)
    assert not out.exists()


def test_probe_finds_the_largest_batch_under_the_limit(tiny_model_dir, monkeypatch):
    """The trials' child processes stand replaced by a machine where each row costs 8 MB (as in test_probe)."""
    from memfit.probe import runner as probe_runner
    from memfit.probe.trial import Trial

    def machine(spec, trial_dir, *, steps, timeout_s, on_step=None, check_interrupted=None):
        settings = {key: spec.config[key] for key in ("batch_size", "lora_rank", "seq_len")}
        peak = 450 * MB + 8 * MB * settings["batch_size"]
        if peak > spec.limit_bytes:
            return Trial(settings, "over_limit", "the guard stopped it", steps, 1, peak, "peak_rss", exit_code=3)
        return Trial(settings, "fits", f"{steps} steps", steps, steps, peak, "peak_rss", step_time_s=0.1,
                     tokens_per_s=1000.0, growth=0.0, exit_code=0)

    monkeypatch.setattr(probe_runner, "run_trial", machine)
    monkeypatch.setattr(probe_runner.Probe, "estimate",
                        lambda self, settings: 440 * MB + 9 * MB * settings["batch_size"])
    events = []
    result = memfit.probe(str(tiny_model_dir), DEMO_DATA, device="cpu", max_memory=0.7, steps=4, seq_len=128,
                          on_event=events.append)
    assert isinstance(result, memfit.ProbeResult)
    assert result.exit_code == 0 and result.status == "found"
    assert result.chosen["batch_size"] == int((int(0.7 * 1024**3) / 1.15 - 450 * MB) // (8 * MB)) == 21
    assert Path(result.profile_path).exists() and events


def test_the_report_sink_writes_once_the_run_has_ended(tmp_path, monkeypatch):
    """report_at_end: the entry points' sink passes every event on and writes the report at the run's end (not at a
    reload, which goes on in a new process, nor at a supervised life that is restarted)."""
    import memfit.report as report
    from memfit.events import ChildEnded

    written = []
    monkeypatch.setattr(report, "write_report", lambda run_dir: written.append(run_dir) or run_dir / "report.html")
    seen = []
    sink = report.report_at_end(tmp_path, seen.append)
    life = dict(attempt=0, step=2, exit_code=-9, outcome="killed", message="", micro_batch=None)
    sink(RunEnded("reload", 75, 2, 4, "reloading"))
    sink(ChildEnded(action="restart", **life))
    assert written == [] and len(seen) == 2
    sink(ChildEnded(action="give_up", **life))
    sink(RunEnded("guard_stop", 3, 2, 4, "stopped"))
    assert written == [tmp_path, tmp_path]
    assert [e.message for e in seen if isinstance(e, Notice)] == [f"run report: {tmp_path / 'report.html'}"] * 2
