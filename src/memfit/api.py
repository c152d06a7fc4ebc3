"""The library's three calls, each returning a typed result: `estimate`, `probe` and `train` (also reachable as
`memfit.estimate(...)`, `memfit.probe(...)`, `memfit.train(...)`), and `recommend`, the built-in sizes that fit.
The `memfit` command is a thin layer over exactly these: it parses flags, calls one, and renders what it returns.

    import memfit

    plan = memfit.estimate("tiny", device="cpu", batch_size=8, seq_len=256)
    run = memfit.train("tiny", "train.jsonl", "runs/a", device="cpu", max_steps=50, batch_size=plan.largest_batch)

Training options are TrainConfig's fields as keywords (the flags' names with `_`); `config_file` is the CLI's -c.
Where a setting comes from, by falling priority: a keyword given, the -c file, a resumed checkpoint's config, a
probe profile's settings (`profile=`), then TrainConfig's default. Events (progress, notices) go to `on_event`;
nothing here prints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from memfit.config import (TrainConfig, build_config, flag_name, option_value, read_config_file,
                           saved_config_values)
from memfit.errors import DiskFullError, UserError
from memfit.events import Event, Notice
from memfit.runtime import check_device, start
from memfit.units import format_gb

if TYPE_CHECKING:
    from memfit.estimate.advice import Suggestion
    from memfit.estimate.memory import Estimate, Hardware
    from memfit.models.resolve import ResolvedModel
    from memfit.probe.runner import ProbeResult
    from memfit.train.loop import TrainJob, TrainResult

EventSink = Callable[[Event], None]


# --- estimate ------------------------------------------------------------------------------------------------------


@dataclass
class EstimateResult:
    """What `estimate` found: the breakdown, the largest batch that fits, and what to change when it does not."""

    estimate: Estimate  # the per-device breakdown (memfit.estimate.memory.Estimate)
    model: ResolvedModel  # what the model name resolved to
    largest_batch: int  # the largest micro-batch that fits (0: not even 1)
    micro_batch: int  # the batch size to train with (with target_batch: the largest that fits, up to the target)
    grad_accum: int  # the accumulation that makes up the target batch (else the config's)
    target_batch: int | None = None
    advice: list[Suggestion] = field(default_factory=list)  # cheapest change first; empty when it fits
    calibration: dict[str, Any] | None = None  # this machine's probe measurements, when they scaled the estimate
    planned_for_cpu: str | None = None  # said when no device was named and this machine has only its CPU
    engine: str = "torch"  # the training engine planned for: torch, or mlx (memfit.estimate.mlx_memory)

    @property
    def fits(self) -> bool:
        return self.estimate.fits

    @property
    def total_bytes(self) -> int:
        return self.estimate.total_bytes

    def to_json(self) -> dict[str, Any]:
        """What `memfit estimate --json` prints: the estimate's JSON with the batch plan and where things came from."""
        from memfit.estimate.memory import to_json

        data = {**to_json(self.estimate, self.largest_batch, self.grad_accum, self.advice),
                "micro_batch_size": self.micro_batch, "calibration": self.calibration,
                "source": self.model.source, "config_source": self.model.origin}
        if self.target_batch:
            data["target_batch"] = self.target_batch
        if self.engine == "mlx":
            data.update(self.estimate.extra_json())
        if self.planned_for_cpu:
            data["notes"] = [self.planned_for_cpu, *data["notes"]]
        return data


def estimate(model: str | None = None, *, device: str | None = None, memory_gb: float | None = None,
             num_gpus: int | None = None, zero: int | None = None, target_batch: int | None = None,
             calibrate: bool = True, config_file: str | Path | None = None, engine: str | None = None,
             **options: Any) -> EstimateResult:
    """The memory a training run will take before it starts, and the largest batch that fits. `memory_gb`: the
    target device's memory (default: 80% of what this machine's device has free). `engine` "mlx": memfit's MLX
    engine (memfit.estimate.mlx_memory: arithmetic, MLX need not be installed), where `memory_gb` with
    device "mps" is the Mac's RAM, of which the GPU may use its recommended working set; "auto": MLX on Apple
    Silicon with MLX installed, else torch."""
    from memfit.cache import CacheMiss
    from memfit.distributed.engines import estimated_sharding
    from memfit.estimate.hardware import planned_hardware
    from memfit.estimate.resolution_cache import cached_resolution, model_fingerprint, remember_resolution

    start()
    file_values = read_config_file(config_file)
    model = option_value(model, file_values, "model", str)
    if model is None:
        raise UserError("missing --model", hint="pass --model M, or put `model: M` in the -c file")
    device = option_value(device, file_values, "device", str)
    memory_gb = option_value(memory_gb, file_values, "memory_gb", float)
    num_gpus = option_value(num_gpus, file_values, "num_gpus", int, 1)
    zero = option_value(zero, file_values, "zero", int, 0)
    target_batch = option_value(target_batch, file_values, "target_batch", int)
    if target_batch is not None and target_batch < 1:
        raise UserError(f"--target-batch must be >= 1 (got {target_batch})")
    config = build_config(options, file_values)
    from memfit.mlx import choose_engine

    # Unlike train, --engine mlx needs no MLX here: its estimate is arithmetic (memfit.estimate.mlx_memory).
    training_engine = choose_engine(option_value(engine, file_values, "engine", str) or "torch", needs_mlx=False)
    if training_engine == "mlx":
        return _estimate_mlx(model, config, device, memory_gb, num_gpus, zero, target_batch)
    zero, engine = estimated_sharding(config, zero)  # --distributed zero3 is --zero 3; fsdp full-shards
    hardware = planned_hardware(device, memory_gb, num_gpus, zero, config.offload, engine)
    # A model estimated before comes from the cache (memfit.cache): no transformers, no torch, no trace.
    # Anything the cache lacks sends it through the real resolution and the tracer, which fill the cache.
    fingerprint = model_fingerprint(model)
    resolved = cached_resolution(model, fingerprint)
    try:
        if resolved is None:
            raise CacheMiss("not resolved before")
        result = _estimate_of(resolved, config, hardware, calibrate, target_batch)
    except CacheMiss:
        from memfit.models import resolve_model

        resolved = resolve_model(model, fetch_config=True)  # a Hub id not cached: its config.json is fetched
        remember_resolution(model, resolved, fingerprint)
        result = _estimate_of(resolved, config, hardware, calibrate, target_batch)
    result.estimate.notes.insert(0, f"model config: {resolved.origin}")
    if device is None and hardware.device == "cpu":
        result.planned_for_cpu = ("planning for this machine's CPU (no GPU here; memory is process RSS): for a GPU, "
                                  "pass --device cuda --memory-gb 24 (its memory in GB)")
    return result


def _estimate_mlx(model: str, config: TrainConfig, device: str | None, memory_gb: float | None,
                  num_gpus: int | None, zero: int | None, target_batch: int | None) -> EstimateResult:
    """`estimate(engine="mlx")`: memfit.estimate.mlx_memory on the resolved config (one device, no calibration:
    probe profiles measure the torch engine's process)."""
    from memfit.estimate.memory import grad_accum_for
    from memfit.estimate.mlx_memory import estimate_mlx, max_batch_mlx, mlx_hardware
    from memfit.models import resolve_model

    if (num_gpus or 1) != 1 or zero:
        raise UserError("--engine mlx trains in one process on one device: no --num-gpus or --zero",
                        hint="drop them, or use --engine torch")
    hardware, ram = mlx_hardware(device, memory_gb)
    resolved = resolve_model(model, fetch_config=True)
    result = estimate_mlx(resolved.config, config, hardware, model_name=resolved.name, unified_bytes=ram)
    largest = max_batch_mlx(resolved.config, config, hardware)
    micro_batch, grad_accum = config.batch_size, config.grad_accum
    if target_batch:
        micro_batch = max(1, min(largest, target_batch))
        grad_accum = grad_accum_for(target_batch, micro_batch, 1)
    result.notes.insert(0, f"model config: {resolved.origin}")
    if not result.fits:
        result.notes.append("does not fit: a smaller --batch-size or --seq-len, --grad-checkpointing, or --quant 4 "
                            "(MLX's QLoRA) shrink it; `memfit recommend --device mps` lists what fits")
    return EstimateResult(result, resolved, largest, micro_batch, grad_accum, target_batch, [], None,
                          engine="mlx")


def _estimate_of(resolved, config: TrainConfig, hardware, calibrate: bool,
                 target_batch: int | None) -> EstimateResult:
    from memfit.estimate.advice import suggestions
    from memfit.estimate.memory import estimate_memory, grad_accum_for, max_batch_size

    result = estimate_memory(resolved.config, config, hardware, model_name=resolved.name)
    calibration = _calibration(resolved, config, hardware) if calibrate else None
    solve_for = hardware
    if calibration:
        ratio = calibration["ratio"]
        result.breakdown["calibration"] = int(result.training_bytes * (ratio - 1))
        result.load_peak_bytes = int(result.load_peak_bytes * ratio)
        result.notes.append(f"calibrated with this machine's probe profile {calibration['profile']}: measured/"
                            f"estimated = {ratio:.3f} over {calibration['trials']} trial(s); --no-calibrate for "
                            "the raw estimate")
        solve_for = replace(hardware, memory_bytes=int(hardware.memory_bytes / ratio))
    largest = max_batch_size(resolved.config, config, solve_for)
    micro_batch, grad_accum = config.batch_size, config.grad_accum
    if target_batch:
        # The largest micro-batch that fits (not more than the target needs); accumulation makes up the rest.
        micro_batch = max(1, min(largest, target_batch))
        grad_accum = grad_accum_for(target_batch, micro_batch, hardware.num_gpus)
    advice = [] if result.fits else suggestions(resolved.config, config, hardware, result.total_bytes)
    return EstimateResult(result, resolved, largest, micro_batch, grad_accum, target_batch, advice, calibration)


def _calibration(resolved, config: TrainConfig, hardware) -> dict[str, Any] | None:
    """This machine's measured/estimated ratio for this model and setup, from a `memfit probe` profile (only for
    one device: the probe measures one process)."""
    from memfit.paths import cache_dir
    from memfit.probe.profile import calibration_for, fingerprint, machine_facts, model_key

    if hardware.num_gpus != 1 or hardware.offload != "none":
        return None
    # No profile of this model on any machine: nothing to find, and no need to detect this one (that imports torch).
    if not any((cache_dir() / "profiles").glob(f"*/{model_key(resolved)}.json")):
        return None
    return calibration_for(resolved, fingerprint(machine_facts()), config.model_dump(), hardware.device)


@dataclass
class RecommendResult:
    """What `recommend` found: for each built-in size and method, the estimate at the configured batch and the
    largest batch that fits."""

    sizes: dict[str, Any]  # memfit.estimate.recommend.recommend's table (on a Mac: recommend_mac's, one per engine):
    # what `memfit recommend --json` prints
    config: TrainConfig  # the settings every size was estimated with
    hardware: Hardware | None  # the one device planned for (None on a Mac: each engine plans its own)


def recommend(*, device: str | None = None, memory_gb: float | None = None, config_file: str | Path | None = None,
              engine: str | None = None, **options: Any) -> RecommendResult:
    """Which built-in model sizes fit in `memory_gb` (default: this machine's), for full, LoRA and QLoRA, with the
    same defaults as estimate, probe and train; a `method` given keeps only that method's column. It plans one
    device: what shards across several is `estimate`'s (num_gpus, zero, offload). On `device` "mps", `memory_gb`
    is the Mac's RAM and the answer is each engine's (`engine` torch or mlx: that one; default both) within what
    macOS lets the GPU use (memfit.estimate.mlx_memory.recommend_mac)."""
    from memfit.estimate.hardware import planned_hardware
    from memfit.estimate.recommend import METHODS
    from memfit.estimate.recommend import recommend as compute

    start()
    file_values = {key: value for key, value in read_config_file(config_file).items()
                   if key in TrainConfig.model_fields}
    given = {**file_values, **options}
    for name in ("distributed", "offload"):
        if name in given and given[name] not in ("auto", "none"):
            raise UserError(f"recommend plans one device and does not take {flag_name(name)} {given[name]}",
                            hint="use memfit estimate --model M --num-gpus N --zero 3 [--offload cpu]")
    if "quant" in given and given["quant"] != "none" and given.get("method") not in ("lora", "qlora"):
        raise UserError(f"--quant {given['quant']} needs --method lora or qlora in recommend (it picks that column)",
                        hint="e.g. memfit recommend --method lora --quant 8")
    config = build_config(options, file_values)
    methods = (config.method,) if "method" in given else METHODS
    if device == "mps":
        from memfit.estimate.mlx_memory import recommend_mac

        mac = recommend_mac(config, memory_gb, methods, _mac_engines(engine))
        return RecommendResult(mac, config, None)
    hardware = planned_hardware(device, memory_gb)
    return RecommendResult(compute(config, hardware, methods=methods), config, hardware)


def _mac_engines(engine: str | None) -> tuple[str, ...]:
    """recommend --device mps: both engines' tables unless one is named (auto: both)."""
    from memfit.mlx import choose_engine

    return ("torch", "mlx") if engine in (None, "auto") else (choose_engine(engine, needs_mlx=False),)


# --- probe ---------------------------------------------------------------------------------------------------------


def probe(model: str | None = None, data: str | Path | None = None, *, device: str | None = None,
          max_memory: float | None = None, steps: int = 15, margin: float = 0.15,
          search: str | tuple[str, ...] = ("batch",), values: tuple[int, ...] | None = None, max_batch: int = 1024,
          powers_of_two: bool = False, min_batch: int = 1, trial_timeout_s: float = 600, fresh: bool = False,
          force: bool = False, config_file: str | Path | None = None, engine: str | None = None,
          on_event: EventSink | None = None, **options: Any) -> ProbeResult:
    """Real training steps in child processes find the largest batch (and rank or sequence length, `search`) that
    fits under `max_memory` GB on this machine; saved as a hardware profile for `train(profile="auto")`.
    `engine` "mlx": the trials train with memfit.mlx (needs mlx and mlx-lm); "auto" as for train."""
    from memfit.probe import ProbeJob
    from memfit.probe import probe as run_probe
    from memfit.probe.profile import AXES

    start()
    check_device(device)
    file_values = read_config_file(config_file)
    model = model or file_values.get("model")
    data = data or file_values.get("data")
    if model is None or data is None:
        raise UserError(f"missing {'--model' if model is None else '--data'}", hint="see memfit probe --help")
    text = search if isinstance(search, str) else ",".join(search)
    axes = tuple(part.strip() for part in text.split(",") if part.strip())
    if any(axis not in AXES for axis in axes) or not axes or axes[0] != "batch":
        raise UserError(f"unknown --search {text!r}: choose batch, batch,rank or batch,seq")
    config = build_config(options, file_values)
    from memfit.mlx import choose_engine

    engine = choose_engine(option_value(engine, file_values, "engine", str) or "torch")
    max_memory = option_value(max_memory, file_values, "max_memory", float)
    device = device or file_values.get("device")
    if max_memory is not None and max_memory > 0 and engine == "torch":
        _check_max_memory(max_memory, str(model), config, device, force, on_event)
    job = ProbeJob(model=str(model), data=Path(data), device=device, max_memory=max_memory, steps=steps,
                   margin=margin, search=axes, values=values, max_batch=max_batch, powers_of_two=powers_of_two,
                   min_batch=min_batch, trial_timeout_s=trial_timeout_s, fresh=fresh, engine=engine)
    if engine == "mlx":
        from memfit.mlx.trainer import check_supported

        check_supported(config, job)  # what MLX cannot run: one line here, not a failed trial
    return run_probe(job, config, on_event=on_event)


def _check_max_memory(max_memory: float, model: str, config: TrainConfig, device: str | None, force: bool,
                      on_event: EventSink | None) -> None:
    """A --max-memory below the estimated peak of micro-batch 1: a UserError (unless `force`); one above what the
    machine has: a warning Notice. (train checks in its training process: memfit.train.loop.)"""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    from memfit.estimate.limit import check_model_limit

    if device is None:
        from memfit.system import detect

        device = detect().default_device()
    for warning in check_model_limit(max_memory, model, config, device, force).warnings:
        if on_event is not None:
            on_event(Notice(f"warning: {warning}", "warning"))


# --- train ---------------------------------------------------------------------------------------------------------


@dataclass
class TrainRun:
    """How a training run ended."""

    exit_code: int  # 0 done; memfit's codes otherwise (memfit.errors)
    output_dir: Path
    status: str | None  # done | guard_stop | oom | interrupted | ... (run.json's, for a supervised run)
    final_dir: Path | None = None  # the adapter (or model) and tokenizer of a finished run
    result: TrainResult | None = None  # the trainer's own last event (None under supervise: it ran in a child)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


# What `resume=` takes besides a path: the newest good checkpoint of `output_dir`.
RESUME_LATEST = True


def train(model: str | None = None, data: str | Path | None = None, output_dir: str | Path | None = None, *,
          val_data: str | Path | None = None, device: str | None = None, resume: str | Path | bool | None = None,
          force: bool = False, profile: str | None = None, config_file: str | Path | None = None,
          engine: str | None = None, on_event: EventSink | None = None, **options: Any) -> TrainRun:
    """Fine-tune with LoRA, QLoRA or full training, guarded against running out of memory (`supervise=True`: in a
    child process brought back when it dies). `resume`: a checkpoint, a run dir, or True for the newest good
    checkpoint of `output_dir`; its model, data and config are the defaults. `profile`: "auto" (this machine's
    `probe` profile of the model) or a profile file, whose settings apply where none was given. `engine`: "torch",
    "mlx" (memfit.mlx) or "auto"; default torch, or a resumed checkpoint's engine."""
    job, config, chosen = training_job(model, data, output_dir, val_data=val_data, device=device, resume=resume,
                                       force=force, profile=profile, config_file=config_file, on_event=on_event,
                                       options=options, engine=engine)
    return run_job(job, config, on_event, engine=chosen)


def training_job(model: str | None, data: str | Path | None, output_dir: str | Path | None, *,
                 val_data: str | Path | None = None, device: str | None = None,
                 resume: str | Path | bool | None = None, force: bool = False, profile: str | None = None,
                 config_file: str | Path | None = None, on_event: EventSink | None = None,
                 options: dict[str, Any] | None = None, engine: str | None = None) -> tuple[TrainJob, TrainConfig, str]:
    """The job and config `train` runs, every setting taken from where it has the highest priority (see the module
    docstring), and the engine (`engine`, else a resumed checkpoint's, else torch); checked before anything is
    written or loaded."""
    from memfit.train import TrainJob
    from memfit.train.checkpoint import open_checkpoint

    options = dict(options or {})
    start()
    check_device(device)
    file_values = read_config_file(config_file)
    checkpoint, saved = None, {}
    if resume is not None and resume is not False:
        if resume is RESUME_LATEST:
            run_dir = output_dir or file_values.get("output_dir")
            if run_dir is None:
                raise UserError("--resume without a directory needs --output-dir (the run to continue)",
                                hint="or pass --resume RUN_DIR/checkpoints/step-N")
            checkpoint = open_checkpoint(Path(run_dir))
        else:
            checkpoint = open_checkpoint(Path(resume))
        saved = checkpoint.meta

    def pick(given, key):  # given, else the -c file, else the checkpoint
        return given if given is not None else file_values.get(key, saved.get(key))

    job_model, job_data, job_out = pick(model, "model"), pick(data, "data"), pick(output_dir, "output_dir")
    for value, flag in ((job_model, "--model"), (job_data, "--data"), (job_out, "--output-dir")):
        if value is None:
            raise UserError(f"missing {flag}", hint="see memfit train --help (or use -c CONFIG.yaml)")
    base, device = saved.get("config"), device or file_values.get("device")
    if base is not None:
        base = saved_config_values(base)  # keys an older memfit did not write: what it did (qlora_upcast)
    if profile is not None:
        if checkpoint is not None:
            raise UserError("--profile and --resume do not mix: a resumed run keeps its checkpoint's settings",
                            hint="drop --profile")
        base, device = _profile_settings(profile, str(job_model), {**file_values, **options}, device, on_event)
    config = build_config(options, file_values, base=base)
    from memfit.mlx import choose_engine

    chosen = choose_engine(engine or saved.get("engine") or "torch")
    if chosen == "torch":  # the MLX engine refuses what it cannot run itself (memfit.mlx.trainer.check_supported)
        from memfit.distributed.engines import check_engine

        check_engine(config, device)  # a missing DeepSpeed or an engine that cannot run here, before anything loads
    job_val = pick(val_data, "val_data")
    if config.eval_every and job_val is None:
        raise UserError("--eval-every needs --val-data", hint="pass a validation JSONL with --val-data")
    job = TrainJob(model=str(job_model), data=Path(job_data), output_dir=Path(job_out),
                   val_data=Path(job_val) if job_val else None, device=device, resume=checkpoint, force=force)
    return job, config, chosen


def _profile_settings(choice: str, model: str, explicit: dict[str, Any], device: str | None,
                      on_event: EventSink | None) -> tuple[dict[str, Any], str | None]:
    """The settings a probe profile gives `train` (explicit options and -c keys still win), and the device."""
    from memfit.models import resolve_model
    from memfit.probe.profile import SETUP_FIELDS, profile_for_training

    say = on_event or (lambda event: None)
    wanted = {key: value for key, value in explicit.items() if key in SETUP_FIELDS}
    if device is not None:
        wanted["device"] = device
    path, entry, notes = profile_for_training(choice, resolve_model(model), wanted)
    for note in notes:
        say(Notice(note, "warning"))
    settings = entry["settings"]
    applied = {key: value for key, value in settings.items() if key not in explicit}
    chosen = entry["chosen"]
    say(Notice(f"profile: {path} (probed {entry['created_at']}): "
               + ", ".join(f"{key} {value}" for key, value in applied.items() if key in
                           ("batch_size", "lora_rank", "seq_len", "max_memory"))
               + f"; measured peak {format_gb(chosen['peak_bytes'])} of {format_gb(entry['limit_bytes'])}"))
    return settings, device or entry["setup"].get("device")


def run_job(job: TrainJob, config: TrainConfig, on_event: EventSink | None = None,
            engine: str = "torch") -> TrainRun:
    """Run a checked job: supervised when the config asks (`supervise`), else in this process; `engine` "mlx"
    trains with memfit.mlx; either way the run report is written as the run ends (memfit.report.report_at_end)."""
    if config.reload_interval and not config.supervise:
        raise UserError("--reload-interval needs --supervise (a process cannot restart itself)",
                        hint="add --supervise")
    if config.tensorboard:
        from memfit.train.tblog import require_tensorboard

        require_tensorboard()  # here, before a supervised child starts or a run dir is created
    if config.supervise:
        return _run_supervised(job, config, on_event, engine)
    if engine == "mlx":
        from memfit.mlx import train_mlx

        from memfit.report import report_at_end

        result = train_mlx(job, config, on_event=report_at_end(job.output_dir, on_event))
    else:
        result = run_training(job, config, on_event)
    return TrainRun(result.exit_code, Path(job.output_dir), result.status, result.final_dir, result)


def run_training(job: TrainJob, config: TrainConfig, on_event: EventSink | None = None) -> TrainResult:
    """The trainer in this process (memfit.train.train), told what the estimator says of the run
    (memfit.sizing) and with the run report written at its end (memfit.report.report_at_end): what an unsupervised
    run and each life of a supervised one run."""
    from memfit.distributed.ranks import current
    from memfit.report import report_at_end, write_report_safely
    from memfit.sizing import EstimatorSizing
    from memfit.train import train as run_trainer

    try:
        return run_trainer(job, config, on_event=report_at_end(job.output_dir, on_event), sizing=EstimatorSizing())
    except DiskFullError:
        if current().is_main:  # run.json says so; the report may fail on the full disk: then a warning says so
            write_report_safely(job.output_dir, on_event)
        raise


def _run_supervised(job: TrainJob, config: TrainConfig, on_event: EventSink | None,
                    engine: str = "torch") -> TrainRun:
    from memfit.models.resolve import check_weights_early
    from memfit.report import report_at_end
    from memfit.train.rundir import RUN_JSON, check_fresh_output_dir
    from memfit.train.supervisor import supervise

    if job.resume is None:
        check_fresh_output_dir(job.output_dir)  # here, not after the child has started
    check_weights_early(job.model)  # damaged weights: one line, before the supervisor writes the run dir
    fields = {"model": job.model, "data": str(job.data), "output_dir": str(job.output_dir),
              "val_data": str(job.val_data) if job.val_data else None, "device": job.device, "force": job.force,
              "resume": str(job.resume.path) if job.resume else None}
    if engine != "torch":
        fields["engine"] = engine  # memfit.child's life trains with it (--engine mlx)
    exit_code = supervise(fields, config.model_dump(), max_restarts=config.max_restarts,
                          reload_interval=config.reload_interval,
                          on_event=report_at_end(job.output_dir, on_event))  # one report, for every life
    try:
        ended = json.loads((Path(job.output_dir) / RUN_JSON).read_text())
    except (OSError, ValueError):
        ended = {}
    final_dir = ended.get("final_dir")
    return TrainRun(exit_code, Path(job.output_dir), ended.get("status"), Path(final_dir) if final_dir else None)
