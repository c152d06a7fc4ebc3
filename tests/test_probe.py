"""memfit probe's parts without child processes: the search, trial classification, journal, profiles, and the
runner wired to a simulated machine (a linear memory curve) in place of real trials."""

import json
import random
import signal
from pathlib import Path

import pytest

from memfit.config import TrainConfig
from memfit.errors import UserError
from memfit.probe import ProbeJob, probe
from memfit.probe import profile as profiles
from memfit.probe import runner as probe_runner
from memfit.probe.search import Outcome, allowed_batches, largest_usable
from memfit.probe.trial import Trial, TrialSpec, _classify, failed_on_input, growth_between

MB, GB = 1024**2, 1024**3
DEMO = Path(__file__).resolve().parents[1] / "src" / "memfit" / "data" / "demo.jsonl"


# --- the search ----------------------------------------------------------------------------------------------------


def _machine(base, per_row, limit, margin=0.15, ceiling=None):
    """try_batch for a machine whose peak is base + per_row x batch; `ceiling`: where the OOM killer strikes."""
    tried = []

    def try_batch(batch):
        tried.append(batch)
        peak = base + per_row * batch
        if peak > limit or (ceiling and peak > ceiling):
            return Outcome(batch, False, None)
        return Outcome(batch, peak * (1 + margin) <= limit, peak)

    return try_batch, tried


def _truth(base, per_row, limit, allowed, margin=0.15, ceiling=None):
    fitting = [b for b in allowed if (base + per_row * b) * (1 + margin) <= limit
               and not (ceiling and base + per_row * b > ceiling)]
    return max(fitting, default=0)


def _doubling_bisection_trials(is_usable, max_batch):
    """Trials Lightning's binsearch mode would run: 2, 4, 8, ... until a failure, then bisect."""
    trials, low, batch = 0, 0, 2
    while batch <= max_batch:
        trials += 1
        if not is_usable(batch):
            break
        low, batch = batch, batch * 2
    high = min(batch, max_batch + 1)
    while high - low > 1:
        middle = (low + high) // 2
        trials += 1
        if is_usable(middle):
            low = middle
        else:
            high = middle
    return trials


def test_an_exact_estimate_needs_two_trials():
    limit, target = 700 * MB, int(700 * MB / 1.15)
    try_batch, tried = _machine(450 * MB, 8 * MB, limit)
    estimate = lambda batch: 450 * MB + 8 * MB * batch  # noqa: E731
    guess = (target - 450 * MB) // (8 * MB)
    best, outcomes = largest_usable(try_batch, guess, target, estimate, allowed_batches(1024, False))
    assert best == _truth(450 * MB, 8 * MB, limit, range(1, 1025)) == 19
    assert tried == [19, 20]  # the guess, and its neighbour proving it the largest
    assert [o.usable for o in outcomes] == [True, False]


@pytest.mark.parametrize("seed", range(40))
def test_search_finds_the_largest_usable_batch_whatever_the_estimator_error(seed):
    rng = random.Random(seed)
    base, per_row = rng.uniform(0.2, 4) * GB, rng.uniform(1, 200) * MB
    limit = base + per_row * rng.uniform(2, 300)
    scale = rng.choice([0.4, 0.7, 0.95, 1.0, 1.05, 1.5, 3.0])  # how wrong the estimator's slope is
    powers_of_two = seed % 5 == 0
    allowed = allowed_batches(1024, powers_of_two)
    ceiling = base + per_row * rng.uniform(1, 100) if seed % 7 == 0 else None  # an OOM killer below the limit
    try_batch, tried = _machine(base, per_row, limit, ceiling=ceiling)
    estimate = lambda batch: base * 0.9 + per_row * scale * batch  # noqa: E731
    target = int(limit / 1.15)
    guess = max(1, int((target - base * 0.9) // (per_row * scale)))
    best, _ = largest_usable(try_batch, guess, target, estimate, allowed)
    assert best == _truth(base, per_row, limit, allowed, ceiling=ceiling)
    assert len(tried) == len(set(tried))  # never the same batch twice
    assert len(tried) <= 2 * len(allowed).bit_length() + 2  # no worse than about twice plain bisection


def test_search_uses_at_most_half_the_trials_of_doubling_and_bisection_with_a_good_estimate():
    rng = random.Random(1)
    ours, theirs = 0, 0
    for _ in range(30):
        base, per_row = rng.uniform(0.3, 2) * GB, rng.uniform(2, 60) * MB
        limit = base + per_row * rng.uniform(8, 200)
        try_batch, tried = _machine(base, per_row, limit)
        scale = rng.uniform(0.9, 1.1)  # the estimator's accuracy measured in docs/benchmarks.md is a few %
        estimate = lambda batch, b=base, p=per_row, s=scale: b + p * s * batch  # noqa: E731
        target = int(limit / 1.15)
        largest_usable(try_batch, max(1, int((target - base) // (per_row * scale))), target, estimate,
                       allowed_batches(1024, False))
        ours += len(tried)
        theirs += _doubling_bisection_trials(lambda b, bb=base, p=per_row: (bb + p * b) * 1.15 <= limit, 1024)
    assert ours * 2 <= theirs, (ours, theirs)


def test_search_starts_from_known_bounds_and_reports_nothing_fits():
    try_batch, tried = _machine(450 * MB, 8 * MB, 700 * MB)
    best, _ = largest_usable(try_batch, 100, 600 * MB, lambda b: None, allowed_batches(1024, False), hi=12)
    assert best == 11 and max(tried) < 12
    try_batch, tried = _machine(900 * MB, 8 * MB, 700 * MB)
    best, _ = largest_usable(try_batch, 5, 600 * MB, lambda b: 900 * MB + 8 * MB * b, allowed_batches(64, False))
    assert best == 0 and tried[-1] == 1


# --- one trial's classification ----------------------------------------------------------------------------------


def _spec(limit=GB):
    config = TrainConfig(batch_size=8, seq_len=128).model_dump()
    return TrialSpec("model", "data.jsonl", "cpu", config, limit)


def _metrics(steps, rss=500 * MB, peak=600 * MB, grow=0):
    return [{"step": i + 1, "loss": 1.0, "watched_bytes": peak, "rss_bytes": rss + grow * i, "peak_rss_bytes": peak,
             "step_time_s": 0.5, "tokens": 1000} for i in range(steps)]


@pytest.mark.parametrize("exit_code, killed_for, steps_done, status, words", [
    (0, None, 15, "fits", "15 steps"),
    (3, None, 2, "over_limit", "guard stopped"),
    (4, None, 1, "oom", "CUDA out of memory"),
    (-signal.SIGKILL, None, 3, "oom", "OOM killer"),
    (-signal.SIGSEGV, None, 3, "error", "SIGSEGV"),
    (2, None, 0, "error", "data.jsonl:3"),
    (1, None, 0, "error", "exit 1"),
    (-signal.SIGKILL, "no progress for 600 s (hung); killed", 4, "error", "hung"),
    (-signal.SIGKILL, "killed by the probe at 1.20 GB, past the limit", 4, "over_limit", "past the limit"),
])
def test_every_way_a_child_ends_is_classified(exit_code, killed_for, steps_done, status, words):
    stderr = {4: "CUDA out of memory. Tried to allocate 2 GiB", 2: "data.jsonl:3: not valid JSON"}.get(exit_code, "")
    trial = _classify(_spec(), 15, exit_code, killed_for, 700 * MB, _metrics(steps_done), stderr, 12.0)
    assert trial.status == status and words in trial.detail
    assert trial.steps_done == steps_done
    assert trial.usable(GB, 0.15) == (status == "fits")
    assert failed_on_input(trial) == (exit_code in (1, 2))


def test_trial_measures_peak_speed_and_growth():
    trial = _classify(_spec(), 15, 0, None, 300 * MB, _metrics(15, grow=10 * MB), "", 20.0)
    assert trial.peak_bytes == 600 * MB and trial.peak_source == "peak_rss"  # the child's own high-water mark
    assert trial.step_time_s == 0.5 and trial.tokens_per_s == 2000
    assert trial.growth == pytest.approx((640 - 590) / 590)  # step-end RSS from step 10 to step 15: +8.5%
    assert not trial.unstable()
    leaking = _classify(_spec(), 15, 0, None, 0, _metrics(15, grow=20 * MB), "", 20.0)
    assert leaking.unstable() and "unstable" in leaking.detail and not leaking.usable(GB, 0.15)
    assert growth_between([100] * 9, 9) is None  # too few steps to tell settling from a leak


def test_a_run_that_peaked_over_the_limit_between_readings_is_over_the_limit():
    trial = _classify(_spec(limit=550 * MB), 15, 0, None, 0, _metrics(15), "", 10.0)
    assert trial.status == "over_limit" and "between readings" in trial.detail


def test_usable_needs_the_margin():
    trial = _classify(_spec(), 15, 0, None, 0, _metrics(15, peak=900 * MB), "", 10.0)
    assert trial.usable(GB, 0.1) and not trial.usable(GB, 0.15)
    assert Trial.from_dict(json.loads(json.dumps(trial.to_dict()))) == trial


# --- profiles ------------------------------------------------------------------------------------------------------


def test_fingerprint_follows_the_hardware_not_the_moment():
    facts = profiles.machine_facts()
    assert profiles.fingerprint(facts) == profiles.fingerprint(profiles.machine_facts())
    assert profiles.fingerprint({**facts, "ram_gib": facts["ram_gib"] + 16}) != profiles.fingerprint(facts)
    gpu = {**facts, "gpus": [{"name": "NVIDIA H100 80GB HBM3", "memory_gib": 80}]}
    assert profiles.fingerprint(gpu) != profiles.fingerprint(facts) and "1gpu" in profiles.fingerprint(gpu)


def test_model_key_is_the_same_model_found_anywhere(tiny_model_dir, tmp_path):
    import shutil

    from memfit.models import resolve_model

    copy = shutil.copytree(tiny_model_dir, tmp_path / "elsewhere" / "tiny")
    assert profiles.model_key(resolve_model(str(tiny_model_dir))) == profiles.model_key(resolve_model(str(copy)))
    assert profiles.model_key(resolve_model("smollm2-135m")) != profiles.model_key(resolve_model(str(copy)))


def _entry(created, chosen_batch, **setup):
    setup = {"method": "lora", "seq_len": 512, "device": "cpu", **setup}
    return {"created_at": created, "setup": setup, "search": ["batch"], "frontier": [{"max_batch": chosen_batch}],
            "chosen": {"batch_size": chosen_batch, "peak_bytes": GB}, "settings": {"batch_size": chosen_batch},
            "limit_bytes": 2 * GB, "calibration": {"ratio": 1.1, "trials": 3}}


def test_profile_keeps_one_entry_per_setup_and_selects_the_compatible_one(tmp_path):
    path = tmp_path / "p.json"
    machine, model = {"fingerprint": "m"}, {"key": "k", "name": "tiny"}
    profiles.save_entry(path, machine, model, _entry("2026-01-01", 8))
    profiles.save_entry(path, machine, model, _entry("2026-01-02", 3, method="full"))
    profiles.save_entry(path, machine, model, _entry("2026-01-03", 9))  # the same setup as the first: replaces it
    data = profiles.read_profile(path)
    assert len(data["entries"]) == 2
    assert profiles.select_entry(data, {}, "p")["chosen"]["batch_size"] == 9  # the newest
    assert profiles.select_entry(data, {"method": "full"}, "p")["chosen"]["batch_size"] == 3
    with pytest.raises(UserError, match="seq_len 512 .you asked 2048"):
        profiles.select_entry(data, {"seq_len": 2048}, "p")


def test_settings_for_a_second_axis_value_come_from_the_frontier(tmp_path):
    entry = {**_entry("2026-01-01", 6), "search": ["batch", "seq"],
             "frontier": [{"seq_len": 256, "max_batch": 20}, {"seq_len": 512, "max_batch": 9},
                          {"seq_len": 1024, "max_batch": 0}],
             "settings": {"batch_size": 9, "seq_len": 512}}
    assert profiles._settings_for(entry, {}, tmp_path) == {"batch_size": 9, "seq_len": 512}
    assert profiles._settings_for(entry, {"seq_len": 256}, tmp_path) == {"batch_size": 20, "seq_len": 256}
    with pytest.raises(UserError, match="no fitting batch for seq_len 1024"):
        profiles._settings_for(entry, {"seq_len": 1024}, tmp_path)


def test_unreadable_profiles_are_one_line_errors(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not a memfit profile"):
        profiles.read_profile(tmp_path / "bad.json")
    with pytest.raises(UserError, match="cannot read profile"):
        profiles.read_profile(tmp_path / "missing.json")


# --- the runner on a simulated machine --------------------------------------------------------------------------


class FakeMachine:
    """Stands in for run_trial: peak = base + per_row x batch x (rank/16) x (seq/128); records every call."""

    def __init__(self, base=450 * MB, per_row=8 * MB, interrupt_at=None, error_at=None):
        self.base, self.per_row = base, per_row
        self.calls: list[dict] = []
        self.interrupt_at, self.error_at = interrupt_at, error_at

    def __call__(self, spec, trial_dir, *, steps, timeout_s, on_step=None, check_interrupted=None):
        settings = {key: spec.config[key] for key in ("batch_size", "lora_rank", "seq_len")}
        self.calls.append(settings)
        trial_dir.mkdir(parents=True, exist_ok=True)
        (trial_dir / "stderr.txt").write_text("Traceback ...\nRuntimeError: boom\n")
        if len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        if len(self.calls) == self.error_at:
            return Trial(settings, "error", "exit 1: RuntimeError: boom", steps, 0, None, "peak_rss", exit_code=1)
        peak = int(self.base + self.per_row * settings["batch_size"] * settings["lora_rank"] / 16
                   * settings["seq_len"] / 128)
        if peak > spec.limit_bytes:
            return Trial(settings, "over_limit", "the guard stopped it", steps, 1, peak, "peak_rss", exit_code=3)
        return Trial(settings, "fits", f"{steps} steps", steps, steps, peak, "peak_rss", step_time_s=0.1,
                     tokens_per_s=1000.0, growth=0.0, exit_code=0)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """A cache per test: probes of the same model and data would otherwise share their journal."""
    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path / "cache"))


def _probe_job(model_dir, **changes):
    return ProbeJob(**{"model": str(model_dir), "data": DEMO, "device": "cpu", "max_memory": 0.7, "steps": 4,
                       **changes})


def test_runner_picks_the_largest_usable_batch_and_saves_the_profile(tiny_model_dir, monkeypatch):
    # The search starts from the real estimator's guess. On CPU that reads this process's file-backed pages, which
    # depend on what the test process ran before (a full suite run guessed 69, then took 5 trials): pin that term,
    # so the path of the search is this test's, not the test order's.
    from memfit.estimate import baseline

    monkeypatch.setattr(baseline, "cpu_file_pages_bytes", lambda: baseline.CPU_FILE_PAGES_FALLBACK_BYTES)
    machine = FakeMachine()
    monkeypatch.setattr(probe_runner, "run_trial", machine)
    events = []
    result = probe(_probe_job(tiny_model_dir), TrainConfig(seq_len=128), on_event=events.append)
    assert result.exit_code == 0
    expected = int((int(0.7 * GB) / 1.15 - 450 * MB) // (8 * MB))
    assert result.chosen["batch_size"] == expected == 21
    # Fewer trials than a bisection of 1..the first guess (97 here: 7 trials); the trials after the guess follow
    # lines through the measured peaks, and the last is the neighbour that proves the answer.
    assert 2 <= len(machine.calls) <= 5
    assert [t["settings"]["batch_size"] for t in result.trials] == [c["batch_size"] for c in machine.calls]
    assert all(c["batch_size"] <= 21 or not t["usable"] for c, t in zip(machine.calls, result.trials))
    assert all(t["estimate_bytes"] for t in result.trials)  # the estimator's prediction for every trial
    saved = profiles.read_profile(Path(result.profile_path))
    entry = saved["entries"][result.entry_key]
    assert entry["settings"]["batch_size"] == 21 and entry["settings"]["max_memory"] == 0.7
    assert entry["calibration"]["trials"] >= 1 and entry["calibration"]["ratio"] > 0
    assert saved["machine"]["fingerprint"] in result.profile_path and "versions" in entry
    kinds = [type(event).__name__ for event in events]
    assert kinds[0] == "ProbeStarted" and kinds[-1] == "ProbeEnded" and "TrialEnded" in kinds


def test_runner_searches_the_rank_axis_with_monotone_bounds(tiny_model_dir, monkeypatch):
    """Slow (15-40 s): the runner estimates every (batch, rank) it considers, and each new rank is a new trace."""
    machine = FakeMachine(per_row=4 * MB)
    monkeypatch.setattr(probe_runner, "run_trial", machine)
    job = _probe_job(tiny_model_dir, search=("batch", "rank"), values=(16, 32, 64, 4096))
    result = probe(job, TrainConfig(seq_len=128), on_event=None)
    frontier = {point["lora_rank"]: point["max_batch"] for point in result.frontier}
    room = int(0.7 * GB) / 1.15 - 450 * MB
    assert frontier == {16: room // (4 * MB), 32: room // (8 * MB), 64: room // (16 * MB), 4096: 0}
    # Rank 4096 fits nothing: the largest rank where a batch fits is chosen.
    assert result.chosen["lora_rank"] == 64 and result.chosen["batch_size"] == frontier[64]
    bound = frontier[16] + 1  # what did not fit at rank 16 is never tried at a larger rank
    assert all(call["batch_size"] <= bound for call in machine.calls if call["lora_rank"] > 16)


def test_interrupted_probe_continues_without_rerunning_finished_trials(tiny_model_dir, monkeypatch):
    first = FakeMachine(interrupt_at=2)
    monkeypatch.setattr(probe_runner, "run_trial", first)
    with pytest.raises(KeyboardInterrupt):
        probe(_probe_job(tiny_model_dir), TrainConfig(seq_len=128))
    second = FakeMachine()
    monkeypatch.setattr(probe_runner, "run_trial", second)
    events = []
    result = probe(_probe_job(tiny_model_dir), TrainConfig(seq_len=128), on_event=events.append)
    assert first.calls[0] not in second.calls  # the finished trial came from the journal
    assert result.trials[0]["from_journal"] and not result.trials[-1]["from_journal"]
    assert events[0].reused_trials == 1
    again = FakeMachine()
    monkeypatch.setattr(probe_runner, "run_trial", again)
    probe(_probe_job(tiny_model_dir), TrainConfig(seq_len=128))
    assert again.calls == []  # everything is in the journal now
    fresh = FakeMachine()
    monkeypatch.setattr(probe_runner, "run_trial", fresh)
    result = probe(_probe_job(tiny_model_dir, fresh=True), TrainConfig(seq_len=128))
    # --fresh measures again, and its first guess uses the calibration the first probe saved. (Where it lands
    # depends on how far this fake machine's slope is from the estimator's: a ratio cannot fix a slope.)
    assert fresh.calls and fresh.calls[0] != first.calls[0] and result.chosen["batch_size"] == 21
    assert not any(trial["from_journal"] for trial in result.trials)


def test_an_error_trial_stops_the_probe_instead_of_reading_as_does_not_fit(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(probe_runner, "run_trial", FakeMachine(error_at=1))
    with pytest.raises(UserError, match="failed with an error, not for lack of memory: exit 1: RuntimeError: boom"):
        probe(_probe_job(tiny_model_dir), TrainConfig(seq_len=128))


def test_probe_checks_input_before_any_trial(tiny_model_dir, tmp_path, monkeypatch):
    machine = FakeMachine()
    monkeypatch.setattr(probe_runner, "run_trial", machine)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    cases = [(_probe_job(tmp_path / "nowhere"), "does not exist"),
             (ProbeJob(model=str(tiny_model_dir), data=bad, device="cpu"), "bad.jsonl:2"),
             (_probe_job(tiny_model_dir, steps=1), "--steps"),
             (_probe_job(tiny_model_dir, margin=1.5), "--margin"),
             (_probe_job(tiny_model_dir, search=("batch", "rank")), "needs --method lora")]
    for job, words in cases:
        config = TrainConfig(method="full") if "rank" in job.search else TrainConfig()
        with pytest.raises(UserError, match=words):
            probe(job, config)
    assert machine.calls == []


def test_ctrl_c_stops_the_probe_at_a_safe_place_not_inside_whatever_runs(monkeypatch, tmp_path):
    # An exception raised from the signal handler would surface anywhere, also inside a callback torch runs from
    # C++ (the estimator's fake tensors being freed), where it ends the process with SIGABRT. The first signal
    # only marks the probe; it stops at the next check. A second one stops it at once.
    import os

    reached = []
    # What the test process had (a background job of a non-interactive shell starts with SIGINT ignored).
    handler_before = signal.getsignal(signal.SIGINT)

    def setup(self):
        os.kill(os.getpid(), signal.SIGINT)
        reached.append("setup went on after the signal")

    monkeypatch.setattr(probe_runner.Probe, "setup", setup)
    monkeypatch.setattr(probe_runner.Probe, "run", lambda self: reached.append("run"))
    with pytest.raises(KeyboardInterrupt):
        probe(ProbeJob(model="m", data=tmp_path / "d.jsonl"), TrainConfig())
    assert reached == ["setup went on after the signal"]

    def setup_twice(self):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        reached.append("not reached")

    monkeypatch.setattr(probe_runner.Probe, "setup", setup_twice)
    with pytest.raises(KeyboardInterrupt):
        probe(ProbeJob(model="m", data=tmp_path / "d.jsonl"), TrainConfig())
    assert reached == ["setup went on after the signal"]
    assert signal.getsignal(signal.SIGINT) is handler_before  # restored
