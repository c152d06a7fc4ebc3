"""memfit report: the HTML page of real tiny runs (a finished one with a threshold warning, an OOM recovery, an
evaluation and checkpoints; one stopped by the guard), of a probe profile, and the CLI's answers to bad paths.
Also --tensorboard, which logs the same run."""

import importlib.util
import json
import re
import shutil
from importlib import resources
from pathlib import Path

import pytest

from memfit import faults
from memfit.cli import main
from memfit.config import TrainConfig
from memfit.guard.sampler import rss_bytes
from memfit.report import write_report, write_report_safely
from memfit.api import run_training as train  # the trainer with the run report at its end
from memfit.train import TrainJob
from memfit.events import Notice

DEMO_DATA = Path(str(resources.files("memfit").joinpath("data/demo.jsonl")))
GB, MB = 1024**3, 1024**2
FAST = dict(seq_len=64, batch_size=4, lr=1e-2, warmup_steps=1, memory_sample_interval=0.05)
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def _inject(monkeypatch, spec):
    monkeypatch.setenv(faults.ENV, spec)
    faults._faults.cache_clear()


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _gb(nbytes):
    return f"{nbytes / GB:.2f} GB"


def _assert_self_contained(text):
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    # Nothing is fetched: no src/href/url() to any address; the only URLs are the SVG namespace names.
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", text, re.I)
    assert "<script" not in text.lower() and "<link" not in text.lower()
    assert set(re.findall(r"https?://[^\s\"'<>]+", text)) <= {"http://www.w3.org/2000/svg",
                                                              "http://www.w3.org/1999/xlink"}


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    """6 real steps: the threshold set under what the run already holds (it warns at once), an injected OOM at
    step 3 (recovered with the micro-batch halved), validation at 3 and 6, a checkpoint at 3; --tensorboard on
    when the package is installed."""
    out = tmp_path_factory.mktemp("report") / "run"
    val = out.parent / "val.jsonl"
    val.write_text("".join(json.dumps({"text": f"Validation line {i} about memory and machines."}) + "\n"
                           for i in range(6)))
    limit_gb = (rss_bytes() + 1.5 * GB) / GB
    config = TrainConfig(**FAST, max_steps=6, max_memory=limit_gb, memory_threshold=0.05, eval_every=3,
                         save_every=3, tensorboard=HAS_TENSORBOARD)
    mp = pytest.MonkeyPatch()
    _inject(mp, "oom@3")
    events = []
    try:
        result = train(TrainJob(str(tiny_model_dir), DEMO_DATA, out, val_data=val, device="cpu"), config,
                       events.append)
    finally:
        mp.undo()
        faults._faults.cache_clear()
    return out, result, events


def test_train_writes_a_self_contained_report_with_the_plots_and_numbers(finished_run):
    out, result, events = finished_run
    assert (result.status, result.exit_code, result.oom_recoveries) == ("done", 0, 1)
    report = out / "report.html"
    notices = [event.message for event in events if isinstance(event, Notice)]
    assert f"run report: {report}" in notices  # written by train() itself, at the end
    text = report.read_text()
    _assert_self_contained(text)
    # Four plots inline: memory, loss/lr, tokens/s, estimate vs peak.
    assert text.count("<svg") == 4 and text.count("</svg>") == 4
    metrics = _lines(out / "metrics.jsonl")
    run = json.loads((out / "run.json").read_text())
    assert f"{metrics[-1]['loss']:.4f}" in text  # the final loss
    val_loss = [e for e in _lines(out / "events.jsonl") if e["event"] == "EvalEnd"][-1]["val_loss"]
    assert f"{val_loss:.4f}" in text
    peak = max(run["peak_watched_bytes"], *(m["watched_bytes"] for m in metrics))
    assert _gb(peak) in text and _gb(run["limit"]["bytes"]) in text and _gb(run["estimate_bytes"]) in text
    assert f"limit {_gb(run['limit']['bytes'])}" in text  # the limit line's legend, inside the memory plot
    assert "threshold 5%" in text  # the threshold line
    assert "finished" in text and "exit code 0" in text
    # Where the guard warned and the OOM was recovered: marked in the plot's legend and listed as events.
    assert "guard: threshold" in text and "OOM recovered (micro-batch halved)" in text
    assert "checkpoint saved" in text and "checkpoints/step-3" in text and "checkpoints/step-6" in text
    assert "validation loss" in text and "learning rate" in text and "tokens/s" in text
    # The config, hardware and versions tables.
    assert run["versions"]["torch"] in text and "lora_rank" in text and "RAM total" in text


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed")
def test_tensorboard_logs_the_same_steps(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = finished_run
    accumulator = EventAccumulator(str(out / "tensorboard"))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "memory/watched_gb", "memory/limit_gb",
            "val/loss"} <= tags
    metrics = _lines(out / "metrics.jsonl")
    logged = accumulator.Scalars("train/loss")
    assert [point.step for point in logged] == [m["step"] for m in metrics]
    assert logged[-1].value == pytest.approx(metrics[-1]["loss"], rel=1e-6)
    assert [point.step for point in accumulator.Scalars("val/loss")] == [3, 6]


def test_tensorboard_missing_is_one_line_and_exit_2(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now raises ImportError
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(DEMO_DATA), "--output-dir", str(out),
                 "--max-steps", "1", "--device", "cpu", "--tensorboard"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install tensorboard" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # checked before anything was written or loaded


def test_a_guard_stopped_run_reports_why_and_a_failed_report_never_changes_the_exit(tiny_model_dir, tmp_path,
                                                                                     monkeypatch, capsys):
    """leak@100 (100 MB kept every step) against a limit 0.35 GB above now: the guard stops with exit 3. The
    automatic report is made to fail: a warning, the same exit code; `memfit report` then renders it."""
    import memfit.report.run_report as run_report

    def broken(data):
        raise RuntimeError("plotting exploded")

    monkeypatch.setattr(run_report, "render_run", broken)
    _inject(monkeypatch, "leak@100")
    out = tmp_path / "run"
    events = []
    config = TrainConfig(**FAST, max_steps=30, max_memory=(rss_bytes() + 0.35 * GB) / GB, save_every=2)
    result = train(TrainJob(str(tiny_model_dir), DEMO_DATA, out, device="cpu"), config, events.append)
    assert (result.status, result.exit_code) == ("guard_stop", 3)
    warnings = [e.message for e in events if isinstance(e, Notice) and e.level == "warning"]
    assert any("could not write the run report" in m and "plotting exploded" in m for m in warnings)
    assert not (out / "report.html").exists()

    monkeypatch.undo()
    faults._faults.cache_clear()
    target = tmp_path / "elsewhere" / "stopped.html"
    assert main(["report", str(out), "--out", str(target)]) == 0
    assert str(target) in capsys.readouterr().out
    text = target.read_text()
    _assert_self_contained(text)
    assert text.count("<svg") == 4
    assert "stopped by the memory guard" in text and "exit code 3" in text
    assert "guard: stop" in text  # the stop's marker in the memory plot
    assert f"memfit train --resume {result.checkpoint}" in text
    stop = next(e for e in _lines(out / "events.jsonl") if e["event"] == "GuardNotice" and e["kind"] != "threshold")
    assert stop["message"].split(":")[0] in text


def test_an_early_stopped_supervised_run_with_damaged_files_still_reports(finished_run, tmp_path):
    """A copy of the real run made to look killed and supervised: no run.json, a cut metrics line, two lives."""
    source, _, _ = finished_run
    out = tmp_path / "run"
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("final", "tensorboard", "report.html"))
    (out / "run.json").unlink()
    metrics = _lines(out / "metrics.jsonl")
    lines = [json.dumps({**m, "attempt": 0 if m["step"] <= 3 else 1}) for m in metrics]
    (out / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 7, "loss": 1.')
    events = [e for e in _lines(out / "events.jsonl") if e["event"] != "RunEnded"]
    (out / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    lives = [{"event": "ChildEnded", "attempt": 0, "step": 3, "exit_code": -9, "outcome": "killed",
              "action": "restart", "message": "killed by SIGKILL: restart 1 of 3", "micro_batch": 2},
             {"event": "ChildEnded", "attempt": 1, "step": 6, "exit_code": -9, "outcome": "killed",
              "action": "give_up", "message": "killed by SIGKILL; not restarting", "micro_batch": None}]
    (out / "supervisor.jsonl").write_text("".join(json.dumps(life) + "\n" for life in lives))
    text = write_report(out).read_text()
    _assert_self_contained(text)
    assert "no run.json" in text and "1 unreadable line(s) in metrics.jsonl" in text
    assert "supervisor restart" in text and "restart 1 of 3" in text and "not restarting" in text
    assert "exit code 4" in text  # a life killed by SIGKILL: the supervisor's exit 4
    assert f"{metrics[-1]['loss']:.4f}" in text


def test_write_report_safely_turns_any_failure_into_a_warning(tmp_path):
    said = []
    assert write_report_safely(tmp_path / "missing", said.append) is None
    assert len(said) == 1 and said[0].level == "warning" and "could not write the run report" in said[0].message


def test_profile_report_plots_peak_against_batch_with_the_limit(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from memfit.probe import ProbeJob, probe
    from memfit.probe import runner as probe_runner
    from memfit.probe.trial import Trial

    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path / "cache"))

    def machine(spec, trial_dir, *, steps, timeout_s, on_step=None, check_interrupted=None):
        settings = {key: spec.config[key] for key in ("batch_size", "lora_rank", "seq_len")}
        batch = settings["batch_size"]
        peak = 450 * MB + 8 * MB * batch  # a machine where each row costs 8 MB
        if peak > spec.limit_bytes:
            return Trial(settings, "over_limit", "the guard stopped it", steps, 1, peak, "peak_rss",
                         exit_code=3)
        return Trial(settings, "fits", f"{steps} steps", steps, steps, peak, "peak_rss",
                     step_time_s=0.1, tokens_per_s=1234.0, growth=0.0, exit_code=0)

    monkeypatch.setattr(probe_runner, "run_trial", machine)
    # The estimator's own figure for each trial (traced, seconds each) is not what this test is about.
    monkeypatch.setattr(probe_runner.Probe, "estimate",
                        lambda self, settings: 440 * MB + 9 * MB * settings["batch_size"])
    job = ProbeJob(model=str(tiny_model_dir), data=DEMO_DATA, device="cpu", max_memory=0.7, steps=4)
    result = probe(job, TrainConfig(seq_len=128))
    assert result.exit_code == 0
    profile = Path(result.profile_path)
    assert main(["report", str(profile)]) == 0
    page = profile.with_suffix(".html")
    assert str(page) in capsys.readouterr().out
    text = page.read_text()
    _assert_self_contained(text)
    assert text.count("<svg") == 1
    assert "limit 0.70 GB" in text and "measured peak" in text and "estimate" in text
    assert f"chosen batch {result.chosen['batch_size']}" in text
    for trial in result.trials:
        assert _gb(trial["peak_bytes"]) in text
    assert "1,234" in text  # tokens/s of the trials


@pytest.mark.parametrize("make", ["missing", "empty_dir", "not_a_profile", "bad_json"])
def test_bad_paths_are_one_line_and_exit_2(tmp_path, capsys, make):
    path = {"missing": tmp_path / "nope", "empty_dir": tmp_path / "empty", "not_a_profile": tmp_path / "x.json",
            "bad_json": tmp_path / "y.json"}[make]
    if make == "empty_dir":
        path.mkdir()
    elif make == "not_a_profile":
        path.write_text(json.dumps({"entries": []}))
    elif make == "bad_json":
        path.write_text("{nope")
    assert main(["report", str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memfit: error: ") and str(path) in lines[0]
    assert "Traceback" not in captured.err and not list(tmp_path.rglob("*.html"))
