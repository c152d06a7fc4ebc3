"""`memfit eval`: loss and perplexity of a base model, or base + a LoRA adapter, on a JSONL file; or completions
for its prompts (`--generate`), with code tasks run against their tests in the sandbox.

The loss is the trainer's validation loss (the same collate, scored tokens and chunked head): mean cross-entropy
per scored token over the file, perplexity its exp. Each sample is one row, cut at --seq-len (no packing: a
sample is scored in its own context). The memory guard watches the run as it watches training; a batch whose
peak crosses the limit stops the evaluation (exit 3).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memfit.config import TrainConfig
from memfit.errors import EXIT_GUARD_STOP, EXIT_OK, EXIT_OOM, UserError
from memfit.eval.events import EvalEnded, EvalProgress, EvalStarted, TaskRun
from memfit.events import Event, GuardNotice, Notice
from memfit.files import write_atomic
from memfit.runtime import check_device

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class EvalJob:
    model: str
    data: Path
    adapter: Path | None = None
    device: str | None = None
    dtype: str = "auto"
    quant: str = "none"  # none | 8 | 4: the base loaded quantized by bitsandbytes, as QLoRA trains it
    batch_size: int = 8
    seq_len: int = 2048
    max_memory: float | None = None  # GB; None: 80% of what is available
    memory_threshold: float = 0.8
    generate: bool = False
    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    timeout_s: float = 10.0  # per code task, wall clock
    allow_unsandboxed: bool = False
    out: Path | None = None  # per-sample results, JSONL
    engine: str = "torch"  # torch | mlx | auto (MLX on Apple Silicon when installed)


@dataclass
class EvalResult:
    status: str  # done | guard_stop | oom
    exit_code: int
    message: str
    summary: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)


class _GuardStop(Exception):
    pass


def check_job(job: EvalJob) -> None:
    for value, flag, low in ((job.batch_size, "--batch-size", 1), (job.seq_len, "--seq-len", 2),
                             (job.max_new_tokens, "--max-new-tokens", 1)):
        if value < low:
            raise UserError(f"{flag} must be at least {low} (got {value})")
    if not (job.temperature >= 0 and math.isfinite(job.temperature)):
        raise UserError(f"--temperature must be a number >= 0 (got {job.temperature})", hint="0 is greedy")
    if not job.timeout_s > 0:
        raise UserError(f"--timeout must be > 0 seconds (got {job.timeout_s})")
    if job.max_memory is not None and not job.max_memory > 0:
        raise UserError(f"--max-memory must be > 0 GB (got {job.max_memory})")
    if job.quant not in ("none", "8", "4"):
        raise UserError(f"unknown --quant {job.quant!r}: choose none, 8 or 4")
    check_device(job.device)
    if job.out is not None and job.out.is_dir():
        raise UserError(f"--out {job.out}: is a directory", hint="give a file name, e.g. results.jsonl")


def resolve_adapter(path: Path) -> Path:
    """The PEFT adapter directory: `path` itself, or a run directory's final/."""
    if not path.exists():
        raise UserError(f"--adapter {path}: no such directory", hint="pass a run's final/ dir (or the run dir)")
    for candidate in (path, path / "final"):
        if (candidate / "adapters.safetensors").is_file() and (candidate / "peft" / ADAPTER_CONFIG).is_file():
            candidate = candidate / "peft"  # an MLX run's final/ (mlx-lm's format): its PEFT export (memfit.mlx)
        if (candidate / ADAPTER_CONFIG).is_file():
            _check_adapter_weights(candidate)
            return candidate
    raise UserError(f"--adapter {path}: not a PEFT adapter (no {ADAPTER_CONFIG} in it or in its final/)",
                    hint="pass the final/ dir of a LoRA run (a full fine-tune's final/ is a model: use --model)")


def _check_adapter_weights(adapter: Path) -> None:
    """A cut-short or garbled adapter_model.safetensors is one line naming it, before the base model loads."""
    from memfit.errors import WeightsDamagedError
    from memfit.models.weights import safetensors_header

    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        return  # PEFT says what is missing
    try:
        problem = safetensors_header(weights)[1]
    except OSError as error:
        raise UserError(f"--adapter {adapter}: cannot read {weights}: {error.strerror or error}") from None
    if problem is not None:
        raise WeightsDamagedError(f"damaged adapter weights: {problem.text}",
                                  hint="copy the adapter again from the run that wrote it (its final/), or train it "
                                       "again")


def load_for_eval(model_dir: Path, adapter: Path | None, precision, device: str, quant: str = "none"):
    """The base model in its frozen dtype (the dtype LoRA training computes with), quantized as training does it
    with `quant`, with the adapter on top."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    from memfit.train.model import load_pretrained, quantization_config

    transformers_logging.disable_progress_bar()
    kwargs: dict[str, Any] = {"dtype": precision.frozen_dtype}
    # One process, no sharding: the 4-bit base stored as one process trains it.
    quantization = quantization_config(TrainConfig(method="lora", quant=quant), precision)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": device if device != "cuda" else torch.cuda.current_device()}
    model = load_pretrained(AutoModelForCausalLM, model_dir, **kwargs)
    if adapter is not None:
        from memfit.libraries import hide_bitsandbytes_from_peft, import_peft

        if quantization is None:
            hide_bitsandbytes_from_peft()  # a 16-bit base: PEFT need not import bitsandbytes
        import_peft()
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as error:  # shapes or module names of another base model
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"--adapter {adapter} does not fit --model {model_dir}: {first[:200]}",
                            hint="use the base model the adapter was trained on (its adapter_config.json "
                                 "names it)") from None
    if quantization is None:
        model.to(device)
    from memfit.models.attention import use_segmented_attention

    use_segmented_attention(model)  # packed rows: attention on each sample alone (dataset_loss passes the bounds)
    model.eval()
    return model


def run_eval(job: EvalJob, on_event: Callable[[Event], None] | None = None) -> EvalResult:
    """Validate everything cheap first (flags, files, every data line, the sandbox), then start the guard, load
    the model and evaluate. Bad input raises UserError before anything heavy happens."""
    from transformers import AutoTokenizer

    from memfit.eval import codetasks
    from memfit.guard import Guard, choose_limit, is_out_of_memory
    from memfit.mlx import choose_engine
    from memfit.models import resolve_model

    emit = on_event or (lambda event: None)
    check_job(job)
    backend = _mlx_backend(job) if choose_engine(job.engine) == "mlx" else _torch_backend(job)
    resolved = resolve_model(job.model)
    model_dir = resolved.require_weights()
    adapter = backend.resolve_adapter(Path(job.adapter)) if job.adapter is not None else None
    tokenizer_dir = adapter if adapter is not None and (adapter / "tokenizer_config.json").is_file() else model_dir
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    inputs = _read_inputs(job, tokenizer, emit)

    # MLX's memory is the system's (unified on a Mac), as the MLX trainer's limit: the CPU's reading.
    limit = choose_limit(job.max_memory, backend.device if backend.engine == "torch" else "cpu")
    emit(Notice(limit.describe()))
    for note in backend.set_limits(limit):
        emit(Notice(note))
    guard = Guard(limit, threshold=job.memory_threshold, **({"reader": backend.reader} if backend.reader else {}))
    guard.start()
    started = time.perf_counter()
    summary: dict[str, Any] = {"model": resolved.name, "model_path": str(model_dir),
                               "adapter": str(adapter) if adapter else None, "data": str(job.data),
                               "mode": inputs.mode, "engine": backend.engine, "device": backend.device,
                               "precision": backend.precision, "samples": inputs.count,
                               "limit_bytes": limit.limit_bytes}
    samples: list[dict[str, Any]] = []
    try:
        try:
            model = backend.load(model_dir, adapter, emit)
            emit(EvalStarted(resolved.name, str(adapter) if adapter else None, backend.device, backend.precision,
                             inputs.mode, inputs.count, limit.limit_bytes, inputs.sandboxed))
            samples, completions = _evaluate(model, inputs, job, tokenizer, backend,
                                             _guarded_progress(guard, emit), summary)
        except _GuardStop as stop:
            return _end(job, emit, summary, samples, guard, backend, "guard_stop", EXIT_GUARD_STOP,
                        f"stopped by the memory guard: {stop}", started)
        except Exception as error:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
            if not is_out_of_memory(error):
                raise
            return _end(job, emit, summary, samples, guard, backend, "oom", EXIT_OOM,
                        f"out of memory: {str(error).splitlines()[0][:200]}", started)
        if inputs.mode == "code":
            del model
            results = _run_code(inputs.tasks, completions, job, inputs.sandboxed, emit)
            samples = [result.to_dict() for result in results]
            summary.update(pass_at_1=codetasks.pass_at_1(results), counts=codetasks.status_counts(results),
                           sandboxed=inputs.sandboxed)
    finally:
        guard.stop()
    return _end(job, emit, summary, samples, guard, backend, "done", EXIT_OK, _done_message(summary),
                started)


@dataclass
class _Backend:
    """What differs between the engines, chosen once: where the model runs, how it loads (with its adapter), how
    the loss of a dataset is computed, and how memory is read and limited."""

    engine: str
    device: str
    precision: str
    resolve_adapter: Callable[[Path], Path]
    load: Callable[[Path, Path | None, Callable], Any]  # (model dir, adapter, emit) -> the model, ready
    loss: Callable[..., tuple[float, int, list[dict]]]  # (model, dataset, tokenizer, batch size, on_batch)
    reader: Callable | None = None  # the guard's memory reader (None: the process and device defaults)
    set_limits: Callable[[Any], list[str]] = lambda limit: []  # the engine's own limits from the guard's
    peaks: Callable[[], dict[str, int]] = dict  # the engine's own peak counters, for the summary


def _torch_backend(job: EvalJob) -> _Backend:
    from memfit.guard import configure_cuda, cuda_alloc_conf_env
    from memfit.precision import resolve_precision
    from memfit.runtime import default_device

    device = job.device or default_device()
    if device == "cuda":
        cuda_alloc_conf_env()
    precision = resolve_precision(job.dtype, device)

    def set_limits(limit) -> list[str]:
        configure_cuda(limit)
        return []

    def peaks() -> dict[str, int]:
        if device == "cuda" and torch.cuda.is_available():
            return {"peak_cuda_reserved_bytes": torch.cuda.max_memory_reserved()}
        return {}

    return _Backend(
        "torch", device, precision.name, resolve_adapter,
        load=lambda model_dir, adapter, emit: load_for_eval(model_dir, adapter, precision, device, job.quant),
        loss=lambda model, dataset, tokenizer, batch_size, on_batch: dataset_loss(
            model, dataset, tokenizer, batch_size, device, precision.compute_dtype, on_batch),
        set_limits=set_limits, peaks=peaks)


def _mlx_backend(job: EvalJob) -> _Backend:
    """MLX (memfit.mlx.evaluate): the loss only; the base and an mlx-lm adapter (an MLX run's final/) loaded as the
    MLX trainer loads them; the guard on MLX's counters with MLX's limits set from it."""
    if job.generate:
        raise UserError("--engine mlx evaluates loss and perplexity; --generate runs on the torch engine",
                        hint="drop --engine mlx (an MLX run's final/peft/ loads there)")
    if job.device not in (None, "cpu", "mps"):
        raise UserError(f"--engine mlx runs on the Apple GPU or the CPU, not --device {job.device}",
                        hint="drop --device, or use --engine torch")
    from memfit.data import pad_token_id
    from memfit.mlx import evaluate as mlx_eval
    from memfit.mlx import memory as mlx_memory

    def load(model_dir: Path, adapter: Path | None, emit):
        model, notes = mlx_eval.load_for_eval(model_dir, adapter, job.dtype, job.quant, mlx_memory.metal())
        for note in notes:
            emit(Notice(note))
        return model

    def set_limits(limit) -> list[str]:
        return [mlx_memory.apply_limits(limit.limit_bytes, job.memory_threshold).describe()]

    return _Backend(
        "mlx", mlx_memory.device_name(), job.dtype if job.dtype != "auto" else "auto (fp32 on a CPU)",
        mlx_eval.resolve_adapter, load,
        loss=lambda model, dataset, tokenizer, batch_size, on_batch: mlx_eval.dataset_loss(
            model, dataset, pad_token_id(tokenizer), batch_size, on_batch),
        reader=mlx_memory.read_mlx_memory, set_limits=set_limits,
        peaks=lambda: {"peak_mlx_bytes": mlx_memory.peak_bytes()})


@dataclass
class _Inputs:
    """What `memfit eval` runs on, read and checked before the model loads."""

    mode: str  # loss | generate | code
    count: int  # samples or tasks
    sandboxed: bool | None = None  # code tasks: whether they run in the sandbox
    dataset: Any = None  # loss: the tokenized rows
    records: list = field(default_factory=list)  # generate: the JSONL records
    tasks: list = field(default_factory=list)  # code: the tasks
    prompts: list = field(default_factory=list)  # generate, code: the prompts' token ids


def _read_inputs(job: EvalJob, tokenizer, emit) -> _Inputs:
    from memfit.eval import codetasks
    from memfit.eval.sandbox import require_sandbox

    if codetasks.is_code_task_file(job.data):
        if not job.generate:
            raise UserError(f"{job.data}: code tasks (\"prompt\" and \"tests\") have no reference to score a loss on",
                            hint="add --generate to generate completions and run their tests")
        tasks = codetasks.read_tasks(job.data)
        sandboxed = require_sandbox(job.allow_unsandboxed)
        return _Inputs("code", len(tasks), sandboxed, tasks=tasks,
                       prompts=[_generation_ids(tokenizer, task.prompt) for task in tasks])
    if job.generate:
        from memfit.data import read_records
        from memfit.eval.generate import prompt_ids

        records = read_records(job.data)
        prompts = [prompt_ids(record, tokenizer, f"{job.data}:{record.line}") for record in records]
        if job.out is None:
            emit(Notice("the completions are kept only with --out FILE.jsonl", "warning"))
        return _Inputs("generate", len(records), records=records, prompts=prompts)
    from memfit.data import build_dataset

    dataset = build_dataset(job.data, tokenizer, job.seq_len, packing=False)
    emit(Notice(f"data: {dataset.stats.summary()}"))
    return _Inputs("loss", len(dataset.samples), dataset=dataset)


def _guarded_progress(guard, emit) -> Callable[..., None]:
    """after_batch(done, total, phase, tokens): the guard's step end after each batch, its events and the progress
    said; raises _GuardStop when the guard asks to stop."""
    steps = [0]

    def after_batch(done: int, total: int, phase: str, tokens: int = 0) -> None:
        steps[0] += 1
        _, events = guard.end_step(steps[0])
        for event in events:
            emit(GuardNotice(event.kind, event.step, event.watched_bytes, event.message))
        emit(EvalProgress(phase, done, total, tokens))
        if guard.stop_requested:
            raise _GuardStop(guard.stop_reason)

    return after_batch


def _evaluate(model, inputs: _Inputs, job: EvalJob, tokenizer, backend: _Backend, after_batch,
              summary: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str] | None]:
    """The loss, or the completions: (per-sample results, the completions of code tasks); `summary` updated."""
    if inputs.mode == "loss":
        loss, tokens, samples = backend.loss(model, inputs.dataset, tokenizer, job.batch_size,
                                             lambda done, total, tokens: after_batch(done, total, "loss", tokens))
        summary.update(loss=loss, perplexity=math.exp(min(loss, 50.0)), tokens=tokens)
        return samples, None
    from memfit.eval.generate import generate

    completions = generate(model, tokenizer, inputs.prompts, max_new_tokens=job.max_new_tokens,
                           temperature=job.temperature, batch_size=job.batch_size, device=backend.device,
                           seed=job.seed,
                           on_batch=lambda done, total: after_batch(done, total, "generate"))
    summary.update(max_new_tokens=job.max_new_tokens, temperature=job.temperature)
    if inputs.mode == "code":
        return [], completions
    return [{"line": record.line, "prompt": _prompt_text(record), "completion": completion,
             "reference": record.completion if record.kind == "prompt_completion" else record.messages[-1]["content"]}
            for record, completion in zip(inputs.records, completions)], None


def _generation_ids(tokenizer, prompt: str) -> list[int]:
    from memfit.eval.generate import text_prompt_ids

    return text_prompt_ids(prompt, tokenizer)


def _prompt_text(record) -> Any:
    if record.kind == "prompt_completion":
        return record.prompt
    last = max(i for i, message in enumerate(record.messages) if message["role"] == "assistant")
    return [dict(message) for message in record.messages[:last]]


def _run_code(tasks, completions, job: EvalJob, sandboxed: bool, emit) -> list:
    from memfit.eval import codetasks
    from memfit.eval.sandbox import Limits

    limits = Limits(wall_s=job.timeout_s, cpu_s=max(1, math.ceil(job.timeout_s)))

    def on_result(index, result):
        emit(TaskRun(index, len(tasks), result.task.task_id, result.run.status, result.run.reason,
                     result.run.wall_s))

    return codetasks.run_tasks(tasks, completions, limits, sandboxed=sandboxed, on_result=on_result)


def dataset_loss(model, dataset, tokenizer, batch_size: int, device, compute_dtype,
                 on_batch: Callable[[int, int, int], None] | None = None) -> tuple[float, int, list[dict]]:
    """(mean CE per scored token, scored tokens, per-sample loss and tokens): the trainer's validation loss
    (memfit.train.validation), with the head applied chunk by chunk where the model allows it."""
    from memfit.data import pad_token_id
    from memfit.models.attention import runs_by_segment
    from memfit.train.chunked_loss import chunked_loss_blocker, head_returns_hidden
    from memfit.train.validation import validation_loss

    with (head_returns_hidden(model) if chunked_loss_blocker(model) is None else nullcontext()) as head:
        result = validation_loss(model, dataset, dataset.rows, batch_size, pad_token_id(tokenizer), device,
                                 head=head, compute_dtype=compute_dtype, by_segment=runs_by_segment(model),
                                 per_sample=True, on_batch=on_batch)
    return result.loss, result.tokens, result.samples


def _done_message(summary: dict[str, Any]) -> str:
    if "loss" in summary:
        return (f"loss {summary['loss']:.4f}, perplexity {summary['perplexity']:.2f} over {summary['tokens']:,} "
                f"tokens of {summary['samples']:,} samples")
    if "pass_at_1" in summary:
        counts = ", ".join(f"{value} {key}" for key, value in summary["counts"].items() if value)
        return f"pass@1 {summary['pass_at_1']:.3f} over {summary['samples']} tasks ({counts})"
    return f"generated {summary['samples']} completions"


def _end(job: EvalJob, emit, summary: dict, samples: list, guard, backend: _Backend, status: str, exit_code: int,
         message: str, started: float) -> EvalResult:
    from memfit.guard import read_memory

    memory = read_memory(backend.device)
    summary.update(status=status, exit_code=exit_code, seconds=round(time.perf_counter() - started, 3),
                   peak_watched_bytes=guard.peak_watched_bytes, peak_rss_bytes=memory.peak_rss_bytes,
                   **backend.peaks())
    if job.out is not None and samples:
        _write_jsonl(job.out, samples)
        summary["out"] = str(job.out)
    emit(EvalEnded(status, exit_code, message, dict(summary)))
    return EvalResult(status, exit_code, message, summary, samples)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """Whole or not at all: written beside, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
