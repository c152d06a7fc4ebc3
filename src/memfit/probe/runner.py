"""`memfit probe`: find the largest settings that really fit on this machine, and save them as a profile.

The recipe that wires the parts: check the input, pick the limit, open the journal, then for each value of the
second axis (LoRA rank or sequence length, when searched) find the largest usable batch with memfit.probe.search,
each trial run by memfit.probe.trial in a child process. Every finished trial goes to the journal first, so an
interrupted probe continues where it stopped; at the end the profile is written (memfit.probe.profile).

Trials run with grad-accum 1: accumulation adds no memory (gradients accumulate in place), only time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from memfit.config import TrainConfig
from memfit.errors import EXIT_OK, EXIT_OOM, UserError, WeightsDamagedError
from memfit.events import Event, Notice
from memfit.paths import cache_dir
from memfit.probe import profile as profiles
from memfit.probe.events import ProbeEnded, ProbeStarted, TrialEnded, TrialStarted, TrialStep
from memfit.probe.search import Outcome, allowed_batches, largest_usable
from memfit.probe.trial import Trial, TrialSpec, child_error, failed_on_input, run_trial
from memfit.runtime import check_device, signals_handled, stop_then_abort
from memfit.units import GB, format_gb

DEFAULT_RANKS = (8, 16, 32, 64, 128, 256)
DEFAULT_SEQ_LENS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
JOURNAL_FORMAT = 1


@dataclass
class ProbeJob:
    """What to probe, besides the training config (whose batch size and searched axes the probe chooses)."""

    model: str
    data: Path
    device: str | None = None
    max_memory: float | None = None  # GB; default 80% of what is available (kept in the journal for a rerun)
    steps: int = 15  # training steps per trial (late allocations show after the first few)
    margin: float = 0.15  # a usable setting keeps peak x (1 + margin) under the limit
    search: tuple[str, ...] = ("batch",)  # ("batch",), ("batch", "rank") or ("batch", "seq")
    values: tuple[int, ...] | None = None  # the second axis' values (default DEFAULT_RANKS / DEFAULT_SEQ_LENS)
    max_batch: int = 1024
    powers_of_two: bool = False  # only try batch sizes 1, 2, 4, 8, ...
    min_batch: int = 1  # with a second axis: its largest value where at least this batch fits is chosen
    trial_timeout_s: float = 600  # the longest a trial may go without finishing a step before it counts as hung
    max_growth: float = 0.10  # a trial whose late-step peak grows more than this is unstable (never chosen)
    fresh: bool = False  # ignore the journal of an earlier run of the same probe
    engine: str = "torch"  # torch, or mlx: the trials train with memfit.mlx and the MLX estimate guides them


ProbeResult = ProbeEnded


def _check(job: ProbeJob, config: TrainConfig) -> None:
    if job.steps < 2:
        raise UserError(f"--steps must be >= 2 (got {job.steps})", hint="15 catches late allocations")
    if not 0 <= job.margin < 1:
        raise UserError(f"--margin must be in [0, 1) (got {job.margin})", hint="0.15 keeps 15% headroom")
    if job.max_batch < 1:
        raise UserError(f"--max-batch must be >= 1 (got {job.max_batch})")
    if job.min_batch < 1:
        raise UserError(f"--min-batch must be >= 1 (got {job.min_batch})")
    if job.trial_timeout_s <= 0:
        raise UserError(f"--trial-timeout must be > 0 (got {job.trial_timeout_s})")
    if job.search not in (("batch",), ("batch", "rank"), ("batch", "seq")):
        raise UserError(f"unknown --search {','.join(job.search)!r}: choose batch, batch,rank or batch,seq")
    if "rank" in job.search and not config.uses_adapters:
        raise UserError("--search batch,rank needs --method lora or qlora (full fine-tuning has no rank)")
    if job.values is not None and (not job.values or min(job.values) < 1 or len(job.search) == 1):
        raise UserError("--values needs --search batch,rank or batch,seq and positive integers",
                        hint="e.g. --search batch,rank --values 16,32,64")
    if job.max_memory is not None and job.max_memory <= 0:
        raise UserError(f"--max-memory must be > 0 (got {job.max_memory})")


def _device(job: ProbeJob) -> str:
    from memfit.system import detect

    device = job.device or detect().default_device()
    check_device(device)
    return device


def _auto_limit_bytes(device: str) -> tuple[int, int]:
    """(limit, available): 80% of what is available, read without creating a CUDA context in this process (the
    parent must leave the GPU to the trials)."""
    from memfit.system import SUGGESTED_FRACTION, detect

    info = detect()
    available = info.ram_available_bytes
    if device == "cuda":
        if not info.gpus:
            raise UserError("--device cuda but no CUDA GPU is visible", hint="check nvidia-smi, or use --device cpu")
        available = min(gpu.free_bytes for gpu in info.gpus)
    return int(available * SUGGESTED_FRACTION), available


def _describe(settings: dict[str, int]) -> str:
    return ", ".join(f"{key} {value}" for key, value in settings.items())


class Journal:
    """Finished trials of one probe, one JSON line each, appended and fsynced as they finish."""

    def __init__(self, path: Path, header: dict[str, Any], fresh: bool):
        self.path = path
        self.trials: dict[str, Trial] = {}
        self.header = header
        if fresh and path.exists():
            path.unlink()
        if path.exists():
            lines = path.read_text().splitlines()
            try:
                self.header = json.loads(lines[0])["journal"]
            except (IndexError, ValueError, KeyError, TypeError):
                lines = []  # unreadable: start over
                path.unlink()
            for line in lines[1:]:
                try:
                    trial = Trial.from_dict(json.loads(line)["trial"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a kill: that trial runs again
                self.trials[self.key(trial.settings)] = trial
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"journal": {**header, "format": JOURNAL_FORMAT}})

    @staticmethod
    def key(settings: dict[str, int]) -> str:
        return json.dumps(settings, sort_keys=True)

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as file:
            file.write(json.dumps(record, default=str) + "\n")
            file.flush()
            os.fsync(file.fileno())

    def add(self, trial: Trial) -> None:
        self.trials[self.key(trial.settings)] = trial
        self._append({"trial": trial.to_dict()})


class Probe:
    def __init__(self, job: ProbeJob, config: TrainConfig, on_event: Callable[[Event], None] | None = None):
        self.job, self.config = job, config
        self.emit = on_event or (lambda event: None)
        self.trials: list[tuple[Trial, bool]] = []  # (trial, from the journal), in the order the search used them
        self._estimates: dict[str, int | None] = {}
        self.interrupted: str | None = None  # the signal's name once Ctrl-C or SIGTERM came (see `probe`)

    def check_interrupted(self) -> None:
        """Where the probe may stop: only pure-Python places (between trials, while waiting on one)."""
        if self.interrupted:
            raise KeyboardInterrupt

    # --- set-up ------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything that can fail fast, before any trial: flags, model files, every data line, the limit."""
        from memfit.data import read_records
        from memfit.models import resolve_model
        from memfit.train.checkpoint import sha256_file

        job, config = self.job, self.config
        _check(job, config)
        self.device = _device(job)
        self.resolved = resolve_model(job.model)
        self.resolved.require_weights()  # a missing model is an error here, never an out-of-memory in a trial
        read_records(job.data, require_distrust=config.loss == "distrust")
        self.model_spec = str(Path(job.model).resolve()) if Path(job.model).is_dir() else job.model
        self.data_sha256 = sha256_file(Path(job.data))
        self.facts = profiles.machine_facts()
        self.machine = profiles.fingerprint(self.facts)
        self.model_key = profiles.model_key(self.resolved)
        self.searched = [profiles.AXES[axis] for axis in job.search]
        self.setup_values = profiles.setup_of(config.model_dump(), self.device, self.searched)
        if job.max_memory is not None:
            limit, auto = int(job.max_memory * GB), False
        else:
            limit, auto = _auto_limit_bytes(self.device)[0], True
        key_facts = {"model": self.model_key, "data": self.data_sha256, "setup": self.setup_values,
                     "search": list(job.search), "values": list(self.axis_values()), "steps": job.steps,
                     "max_batch": job.max_batch, "pow2": job.powers_of_two,
                     "limit": "auto" if auto else limit}
        if job.engine != "torch":  # an MLX probe is its own journal and profile entry (torch's keys unchanged)
            key_facts["engine"] = self.setup_values["engine"] = job.engine
        probe_key = hashlib.sha256(json.dumps(key_facts, sort_keys=True).encode()).hexdigest()[:16]
        journal_path = cache_dir() / "probe" / self.machine / f"{self.model_key}-{probe_key}.jsonl"
        prior = profiles.calibration_for(self.resolved, self.machine, config.model_dump(), self.device)
        self.journal = Journal(journal_path, {"limit_bytes": limit, "limit_auto": auto, **key_facts,
                                              "prior_ratio": float(prior["ratio"]) if prior else 1.0,
                                              "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, job.fresh)
        # A rerun continues under the limit and the calibration the journal's first run started with: the same
        # guesses then meet the journaled trials (a profile that run saved would otherwise move the first guess).
        self.limit_bytes = int(self.journal.header["limit_bytes"])
        self.limit_auto = bool(self.journal.header["limit_auto"])
        self.target_bytes = int(self.limit_bytes / (1 + job.margin))
        self.prior_ratio = float(self.journal.header.get("prior_ratio", 1.0))

    def axis_values(self) -> tuple[int, ...]:
        if len(self.job.search) == 1:
            return ()
        if self.job.values:
            return tuple(sorted(set(self.job.values)))
        if "rank" in self.job.search:
            return DEFAULT_RANKS
        text = self.resolved.config.get_text_config()
        longest = getattr(text, "max_position_embeddings", None) or DEFAULT_SEQ_LENS[-1]
        return tuple(seq for seq in DEFAULT_SEQ_LENS if seq <= longest)

    # --- estimates ---------------------------------------------------------------------------------------------

    def _config_for(self, settings: dict[str, int]) -> TrainConfig:
        return self.config.updated(**settings, grad_accum=1)

    def estimate(self, settings: dict[str, int]) -> int | None:
        from memfit.estimate.memory import Hardware, estimate_memory

        key = Journal.key(settings)
        if key not in self._estimates:
            try:
                hardware = Hardware(self.device, self.limit_bytes)
                if self.job.engine == "mlx":
                    from memfit.estimate.mlx_memory import estimate_mlx

                    found = estimate_mlx(self.resolved.config, self._config_for(settings), hardware,
                                         self.resolved.name)
                else:
                    found = estimate_memory(self.resolved.config, self._config_for(settings), hardware,
                                            self.resolved.name)
                self._estimates[key] = found.total_bytes
            except Exception:  # noqa: BLE001 - the estimate guides the search; a trial decides
                self._estimates[key] = None
        return self._estimates[key]

    def calibration(self) -> dict[str, Any] | None:
        """measured/estimated over the trials that ran to the end."""
        ratios = [trial.peak_bytes / trial.estimate_bytes for trial, _ in self.trials
                  if trial.status == "fits" and trial.peak_bytes and trial.estimate_bytes]
        if not ratios:
            return None
        ordered = sorted(ratios)
        middle = len(ordered) // 2
        median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
        return {"ratio": round(median, 4), "trials": len(ratios), "min": round(ordered[0], 4),
                "max": round(ordered[-1], 4), "measured": self.trials[0][0].peak_source}

    def first_guess(self, axis: dict[str, int]) -> int:
        """The estimator's largest batch for the target, scaled by the calibration known so far."""
        from memfit.estimate.memory import Hardware, max_batch_size

        calibration = self.calibration()
        ratio = calibration["ratio"] if calibration else self.prior_ratio
        try:
            hardware = Hardware(self.device, int(self.target_bytes / ratio))
            solve = max_batch_size
            if self.job.engine == "mlx":
                from memfit.estimate.mlx_memory import max_batch_mlx as solve
            guess = solve(self.resolved.config, self._config_for({**axis, "batch_size": 1}), hardware,
                          limit=self.job.max_batch)
        except Exception:  # noqa: BLE001 - no estimate: start small and double
            guess = 1
        return max(1, guess)

    # --- trials ------------------------------------------------------------------------------------------------

    def _full(self, settings: dict[str, int]) -> dict[str, int]:
        """A trial's settings with the axes it does not search filled in: the journal's key and Trial.settings."""
        return {"batch_size": 1, "lora_rank": self.config.lora_rank, "seq_len": self.config.seq_len, **settings}

    def try_settings(self, settings: dict[str, int]) -> Outcome:
        job = self.job
        full = self._full(settings)
        number = len(self.trials) + 1
        cached = self.journal.trials.get(Journal.key(full))
        self.check_interrupted()
        if cached is not None:
            trial, from_journal = cached, True
        else:
            estimate = self.estimate(settings)
            self.emit(TrialStarted(number, full, estimate))
            trial = self._run(full, number)
            trial.estimate_bytes = estimate
            if failed_on_input(trial):
                reported = child_error(self.workdir / f"trial-{number}")
                if reported and reported.get("weights_damaged") and reported.get("line"):
                    # The model's files, not this setting: the child's own line, as `memfit train` prints it.
                    raise WeightsDamagedError(str(reported["line"]))
                log = self.journal.path.with_suffix(f".trial-{number}.stderr.txt")
                shutil.copyfile(self.workdir / f"trial-{number}" / "stderr.txt", log)
                raise UserError(f"trial {number} ({_describe(full)}) failed with an error, not for lack of memory: "
                                f"{trial.detail}", hint=f"fix that and rerun; the trial's full output is in {log}")
            self.journal.add(trial)
            from_journal = False
        usable = trial.usable(self.limit_bytes, job.margin, job.max_growth)
        self.trials.append((trial, from_journal))
        self.emit(TrialEnded(number, trial.to_dict(), usable, from_journal))
        # An OOM's peak is the parent's sampling of a dying process; the others are the child's own readings.
        return Outcome(full["batch_size"], usable, trial.peak_bytes if trial.status in ("fits", "over_limit") else None)

    def _run(self, settings: dict[str, int], number: int) -> Trial:
        job = self.job
        values = self._config_for(settings).model_dump()
        values.update(max_steps=job.steps, max_memory=self.limit_bytes / GB, eval_every=None,
                      save_every=10**9, memory_report_interval=10**9)
        spec = TrialSpec(model=self.model_spec, data=str(Path(job.data).resolve()), device=self.device,
                         config=values, limit_bytes=self.limit_bytes, engine=job.engine)

        def on_step(line: dict[str, Any]) -> None:
            self.emit(TrialStep(number, int(line["step"]), job.steps, float(line["loss"]),
                                int(line.get("watched_bytes") or 0)))

        return run_trial(spec, self.workdir / f"trial-{number}", steps=job.steps, timeout_s=job.trial_timeout_s,
                         on_step=on_step, check_interrupted=self.check_interrupted)

    # --- the search --------------------------------------------------------------------------------------------

    def run(self) -> ProbeResult:
        job = self.job
        self.emit(ProbeStarted(self.resolved.name, self.device, self.limit_bytes, self.limit_auto, job.margin,
                               job.steps, list(job.search), str(self.journal.path), len(self.journal.trials)))
        if self.prior_ratio != 1.0:
            self.emit(Notice(f"first guesses use this machine's earlier calibration: measured/estimated = "
                             f"{self.prior_ratio:.3f}"))
        allowed = allowed_batches(job.max_batch, job.powers_of_two)
        self.workdir = Path(tempfile.mkdtemp(prefix="memfit-probe-"))
        frontier: list[dict[str, Any]] = []
        try:
            axis_name = self.searched[1] if len(self.searched) > 1 else None
            hi = None
            for value in (self.axis_values() or (None,)):
                axis = {axis_name: value} if axis_name else {}
                best, outcomes = largest_usable(
                    lambda batch: self.try_settings({**axis, "batch_size": batch}), self.first_guess(axis),
                    self.target_bytes, lambda batch: self.estimate({**axis, "batch_size": batch}), allowed, hi=hi)
                frontier.append({**axis, "max_batch": best})
                if best < job.min_batch:
                    break  # a larger rank or sequence fits even less
                # What did not fit at this value will not fit at a larger one.
                unusable = [o.batch for o in outcomes if not o.usable and o.batch > best]
                hi = min(unusable) if unusable else None
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.check_interrupted()  # Ctrl-C after the last trial: every trial is in the journal, a rerun is instant
        return self._finish(frontier)

    def _chosen(self, frontier: list[dict[str, Any]]) -> dict[str, Any] | None:
        fitting = [point for point in frontier if point["max_batch"] >= self.job.min_batch]
        if not fitting:
            return None
        point = fitting[-1]
        settings = {key: value for key, value in point.items() if key != "max_batch"}
        settings["batch_size"] = point["max_batch"]
        full = self._full(settings)
        trial = next(t for t, _ in self.trials if t.settings == full)
        return {**settings, "peak_bytes": trial.peak_bytes, "peak_x_margin_bytes": int(trial.peak_bytes *
                (1 + self.job.margin)), "estimate_bytes": trial.estimate_bytes, "step_time_s": trial.step_time_s,
                "tokens_per_s": trial.tokens_per_s}

    def _finish(self, frontier: list[dict[str, Any]]) -> ProbeResult:
        from memfit.train.rundir import versions

        job = self.job
        chosen = self._chosen(frontier)
        calibration = self.calibration()
        settings = None
        if chosen:
            settings = {key: value for key, value in self.setup_values.items() if key not in ("device", "engine")}
            settings.update({key: chosen[key] for key in self.searched})
            if not self.limit_auto:
                settings["max_memory"] = round(self.limit_bytes / GB, 3)
        trials = [{**trial.to_dict(), "usable": trial.usable(self.limit_bytes, job.margin, job.max_growth),
                   "from_journal": cached} for trial, cached in self.trials]
        entry = {
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "setup": self.setup_values,
            "search": list(job.search), "values": list(self.axis_values()), "limit_bytes": self.limit_bytes,
            "limit_auto": self.limit_auto, "margin": job.margin, "steps": job.steps, "chosen": chosen,
            "settings": settings, "frontier": frontier, "trials": trials, "calibration": calibration,
            "data": {"path": str(Path(job.data).resolve()), "sha256": self.data_sha256}, "versions": versions(),
            "journal": str(self.journal.path),
        }
        path = profiles.profile_path(self.machine, self.model_key)
        profiles.save_entry(path, {"fingerprint": self.machine, **self.facts},
                            {"spec": self.model_spec, "name": self.resolved.name, "key": self.model_key}, entry)
        if chosen:
            axes = ", ".join(f"{key} {chosen[key]}" for key in self.searched)
            status, exit_code, message = "found", EXIT_OK, f"largest usable: {axes}"
        else:
            status, exit_code = "nothing_fits", EXIT_OOM
            message = (f"nothing fits under {format_gb(self.limit_bytes)} with a {job.margin:.0%} margin, not even "
                       f"batch {job.min_batch}")
        ended = ProbeEnded(status, exit_code, chosen, frontier, trials, str(path),
                           profiles.setup_key(self.setup_values), calibration, message)
        self.emit(ended)
        return ended


def probe(job: ProbeJob, config: TrainConfig, on_event: Callable[[Event], None] | None = None) -> ProbeResult:
    """Run the probe; returns how it ended. Ctrl-C and SIGTERM end it (KeyboardInterrupt) at the next safe place:
    the running trial's child is killed, finished trials stay in the journal for the rerun. A second one ends it at
    once."""
    runner = Probe(job, config, on_event)

    with signals_handled(stop_then_abort(runner)):
        try:
            runner.setup()
            runner.check_interrupted()
            return runner.run()
        except KeyboardInterrupt:
            journal = getattr(runner, "journal", None)
            if journal is not None:
                runner.emit(Notice(f"interrupted: {len(journal.trials)} finished trial(s) kept in {journal.path}; "
                                   "run the same command again to continue", "warning"))
            raise
