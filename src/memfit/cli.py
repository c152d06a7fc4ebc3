"""The `memfit` command: parse, call the library, render. Errors become one line on stderr and an exit code."""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from memfit.config import (GUARD_FIELDS, NO_MEMORY_FIELDS, TrainConfig, build_config, flag_name, make_config,
                           read_config_file)
from memfit.errors import EXIT_INTERRUPTED, EXIT_USAGE, MemfitError, UserError, error_line
from memfit.libraries import hide_bitsandbytes_from_peft
from memfit.runtime import check_device
from memfit.runtime import start as start_process

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune LLMs that fit: estimate, probe, train with a memory guard, report.")
console = Console()


# --- training flags, generated from TrainConfig ------------------------------------------------------------------


def _flag_type(annotation: Any) -> type:
    """The click-facing type of a config field: Literal choices travel as str so pydantic's one-line errors win."""
    origin = typing.get_origin(annotation)
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if origin is typing.Literal:
        return str
    if args and origin is not None:
        return _flag_type(args[0])
    return annotation if annotation in (int, float, bool, str) else str


def training_flags(include_guard: bool = False, memory_only: bool = False, defaults: Optional[dict] = None):
    """Add every TrainConfig field as a `--flag` to a command; the command receives them as `training: dict`
    holding only the flags the user gave (so a -c config file supplies the rest). `memory_only` (the read
    commands): the flags that change no memory (NO_MEMORY_FIELDS) are accepted but left out of --help.
    `defaults`: the command's own defaults where they differ from TrainConfig's (the demo), shown in --help."""

    def decorate(command):
        own = [p for p in inspect.signature(command).parameters.values() if p.name != "training"]
        added = []
        for name, field in TrainConfig.model_fields.items():
            if name in GUARD_FIELDS and not include_guard:
                continue
            kind = _flag_type(field.annotation)
            default = (defaults or {}).get(name, field.default)
            if kind is bool and default is not None:
                default = flag_name(name) if default else f"--no-{name.replace('_', '-')}"
            default = "none" if default is None else default
            described = default == "none" and "default" in (field.description or "")  # says it in its own words
            help_text = field.description if described else f"{field.description} (default: {default})"  # not [..]: rich reads that as markup
            hidden = memory_only and name in NO_MEMORY_FIELDS
            if kind is bool:
                option = typer.Option(None, f"{flag_name(name)}/--no-{name.replace('_', '-')}", help=help_text,
                                      show_default=False, rich_help_panel="Training", hidden=hidden)
            else:
                option = typer.Option(None, flag_name(name), help=help_text, show_default=False, hidden=hidden,
                                      rich_help_panel="Guard" if name in GUARD_FIELDS else "Training")
            added.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                           annotation=Optional[kind]))

        @functools.wraps(command)
        def wrapper(**kwargs):
            training = {name: kwargs.pop(name) for name in list(kwargs) if name in TrainConfig.model_fields}
            training = {name: value for name, value in training.items() if value is not None}
            return command(training=training, **kwargs)

        wrapper.__signature__ = inspect.Signature(own + added)
        wrapper.__annotations__ = {p.name: p.annotation for p in own + added}
        return wrapper

    return decorate


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


# --- commands ----------------------------------------------------------------------------------------------------


@app.command()
def system(as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """What hardware is here: RAM, swap, CPUs, GPUs, and the suggested memory limit."""
    from memfit.cuda_context import measure_and_record
    from memfit.system import detect
    from memfit.views import render_system

    info = detect()
    # A GPU here: its CUDA context measured with NVML and recorded for this machine's estimates (memfit.cuda_context).
    context = measure_and_record() if info.gpus else None
    if as_json:
        return _print_json({**info.to_dict(), "cuda_context": context.to_dict() if context else None})
    render_system(console, info, context)


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Built-in architectures and aliases that --model accepts (besides local dirs, the HF cache and Hub ids).
    Off a terminal, or on one too narrow for the table, a plain layout that never cuts a name or repo id."""
    from memfit.models.registry import catalog
    from memfit.models.resolve import hf_hub_cache
    from memfit.views import render_models

    if as_json:
        return _print_json({**catalog(), "hf_cache": str(hf_hub_cache())})
    render_models(console)


@app.command()
@training_flags(memory_only=True)
def estimate(
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="local dir, Hub id ORG/NAME[@REV] (only its config.json is fetched), "
                                        "alias or built-in (or -c's model)"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or mps (default: what this machine has)"),
    memory_gb: Optional[float] = typer.Option(None, "--memory-gb", help="device memory in GB (default: 80% of free)"),
    num_gpus: Optional[int] = typer.Option(None, "--num-gpus", help="data-parallel devices (default: 1)"),
    zero: Optional[int] = typer.Option(None, "--zero", help="DeepSpeed ZeRO stage 0-3 (default: 0)"),
    target_batch: Optional[int] = typer.Option(None, "--target-batch", help="global batch to reach: the largest micro-batch that fits, and the grad-accum that makes up the rest (default: none)"),
    engine: Optional[str] = typer.Option(None, "--engine", help="torch (default), mlx or auto (MLX on Apple Silicon)"),
    calibrate: bool = typer.Option(True, "--calibrate/--no-calibrate",
                                   help="scale by this machine's `memfit probe` measurements when there are some"),
    check: bool = typer.Option(False, "--check", help="exit 0 when it fits, 1 when it does not (2: bad input), "
                               "for launch scripts"),
    config_file: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file with the same keys"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    training: dict = None,
):
    """Memory breakdown of a training run before you start it, and the largest batch that fits."""
    from memfit.api import estimate as compute
    from memfit.views import render_estimate

    hide_bitsandbytes_from_peft()  # this process never trains: a k-bit base is emulated in the trace
    # The command's own options may come from the -c file too (its keys are the flags' names); a flag wins.
    found = compute(model, device=device, memory_gb=memory_gb, num_gpus=num_gpus, zero=zero,
                    target_batch=target_batch, calibrate=calibrate, config_file=config_file, engine=engine,
                    **training)
    if as_json:
        _print_json(found.to_json())
    else:
        if found.planned_for_cpu:
            console.print(found.planned_for_cpu, soft_wrap=True, highlight=False)
        render_estimate(console, found)
    if check and not found.fits:
        raise typer.Exit(1)


@app.command()
@training_flags(memory_only=True)
def recommend(
    memory_gb: Optional[float] = typer.Option(None, "--memory-gb", help="memory in GB (default: this machine)"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or mps (default: what this machine has)"),
    engine: Optional[str] = typer.Option(None, "--engine", help="with --device mps: torch or mlx only (default both)"),
    config_file: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file with the same keys"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    training: dict = None,
):
    """Which built-in model sizes fit, for full, LoRA and QLoRA (computed by the estimator, with the same defaults
    as estimate, probe and train). --method (and --quant with lora/qlora) keeps only that method's column."""
    from memfit.api import recommend as compute
    from memfit.views import render_recommend

    hide_bitsandbytes_from_peft()  # this process never trains: a k-bit base is emulated in the trace
    found = compute(device=device, memory_gb=memory_gb, config_file=config_file, engine=engine, **training)
    if as_json:
        return _print_json(found.sizes)
    render_recommend(console, found)


@app.command("init-model")
def init_model_command(
    preset: str = typer.Option("tiny", "--preset", help="built-in architecture name (see memfit models)"),
    out: Path = typer.Option(..., "--out", help="directory to create"),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, bf16 or fp16"),
    layers: Optional[int] = typer.Option(None, "--layers", help="override the number of decoder layers"),
    seed: int = typer.Option(0, "--seed"),
    force: bool = typer.Option(False, "--force", help="allow presets above the small-model size"),
):
    """Write a random-init HF model directory (config, safetensors, tokenizer) that transformers loads."""
    from memfit.models import init_model

    if layers is not None and layers < 1:
        raise UserError(f"--layers must be >= 1 (got {layers})")
    path = init_model(preset, out, dtype=dtype, force=force, num_layers=layers, seed=seed)
    console.print(f"wrote {preset} ({dtype}) to {path}")


def _int_list(text: Optional[str], flag: str) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(f"{flag} takes comma-separated integers (got {text!r})", hint="e.g. 16,32,64") from None


@app.command()
@training_flags()
def probe(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="local dir, HF id in the HF cache, or alias"),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="training JSONL (tokenized as training does)"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or mps (default: the best this machine has)"),
    limit_gb: Optional[float] = typer.Option(None, "--max-memory", help="limit in GB (default: 80% of available)"),
    engine: Optional[str] = typer.Option(None, "--engine", help="trials on torch (default), mlx or auto"),
    steps: int = typer.Option(15, "--steps", help="training steps per trial (late allocations show after a few)"),
    margin: float = typer.Option(0.15, "--margin", help="usable: peak x (1 + margin) stays under the limit"),
    search: str = typer.Option("batch", "--search", help="batch, batch,rank or batch,seq"),
    values: Optional[str] = typer.Option(None, "--values", help="the second axis' values, e.g. 16,32,64"),
    max_batch: int = typer.Option(1024, "--max-batch", help="largest batch size to try"),
    pow2: bool = typer.Option(False, "--pow2", help="only try powers of two (1, 2, 4, 8, ...)"),
    min_batch: int = typer.Option(1, "--min-batch", help="with a second axis: the batch its chosen value must fit"),
    trial_timeout: float = typer.Option(600, "--trial-timeout", help="seconds without a finished step = hung"),
    fresh: bool = typer.Option(False, "--fresh", help="measure again instead of reusing this probe's journal"),
    force: bool = typer.Option(False, "--force", help="start with a --max-memory below the estimated peak of "
                               "micro-batch 1"),
    config_file: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file with the flags' keys"),
    as_json: bool = typer.Option(False, "--json", help="print the profile as one JSON object"),
    training: dict = None,
):
    """Find the largest batch (and rank or sequence length) that really fits here: real training steps in child
    processes, saved as a hardware profile for `train --profile auto`."""
    from memfit.api import probe as run_probe
    from memfit.probe.profile import AXES, read_profile
    from memfit.render import ProbeRenderer

    axes = [part.strip() for part in search.split(",") if part.strip()]
    renderer = ProbeRenderer(Console(stderr=True) if as_json else console, [AXES.get(axis) for axis in axes])
    try:
        result = run_probe(model, data, device=device, max_memory=limit_gb, steps=steps, margin=margin,
                           search=search, values=_int_list(values, "--values"), max_batch=max_batch,
                           powers_of_two=pow2, min_batch=min_batch, trial_timeout_s=trial_timeout, fresh=fresh,
                           force=force, config_file=config_file, engine=engine, on_event=renderer, **training)
    finally:
        renderer.close()
    if as_json:
        saved = read_profile(Path(result.profile_path))
        _print_json({"profile_path": result.profile_path, "machine": saved["machine"], "model": saved["model"],
                     **saved["entries"][result.entry_key]})
    raise typer.Exit(result.exit_code)


@app.command()
@training_flags(include_guard=True)
def train(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="local dir, HF id in the HF cache, or alias"),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="training JSONL: text, prompt+completion or messages"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="run directory to create"),
    val_data: Optional[Path] = typer.Option(None, "--val-data", help="validation JSONL (see --eval-every)"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or mps (default: the best this machine has)"),
    resume: Optional[str] = typer.Option(
        None, "--resume", help="continue from a checkpoint: a checkpoints/step-N dir, a run dir, or alone for the "
        "newest good checkpoint of --output-dir; the checkpoint's model, data and config are the defaults"),
    force: bool = typer.Option(False, "--force", help="resume even if the config or data changed; start with a "
                               "--max-memory below the estimated peak of micro-batch 1"),
    profile: Optional[str] = typer.Option(
        None, "--profile", help="auto: this machine's `memfit probe` profile for --model; or a profile JSON file. "
        "Its batch size (and rank or seq-len when probed) apply unless given explicitly"),
    config_file: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file with the flags' keys"),
    engine: Optional[str] = typer.Option(None, "--engine", help="torch, mlx (MLX through mlx-lm: pip install "
                                         "'memfit[mlx]'), or auto (MLX on Apple Silicon when installed); default "
                                         "torch, or a resumed checkpoint's engine"),
    training: dict = None,
):
    """Fine-tune with LoRA, QLoRA or full training, guarded against running out of memory."""
    from memfit.api import RESUME_LATEST
    from memfit.api import train as run_train
    from memfit.render import TrainRenderer

    renderer = TrainRenderer(console)
    try:
        run = run_train(model, data, output_dir, val_data=val_data, device=device,
                        resume=RESUME_LATEST if resume == _RESUME_LATEST else resume, force=force, profile=profile,
                        config_file=config_file, engine=engine, on_event=renderer, **training)
    finally:
        renderer.close()
    raise typer.Exit(run.exit_code)


@app.command("launch-config")
@training_flags(include_guard=True)
def launch_config(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="for the printed command, and the layer FSDP wraps"),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="for the printed command"),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o", help="for the printed command"),
    num_processes: Optional[int] = typer.Option(None, "--num-processes", help="processes (GPUs) per machine "
                                                "(default: the GPUs here, else 1)"),
    num_machines: int = typer.Option(1, "--num-machines", help="machines (nodes)"),
    machine_rank: int = typer.Option(0, "--machine-rank", help="this machine's rank written in the YAML (0: main)"),
    main_process_ip: Optional[str] = typer.Option(None, "--main-process-ip", help="machine 0's address (M > 1)"),
    main_process_port: int = typer.Option(29500, "--main-process-port", help="machine 0's rendezvous port"),
    out: Optional[Path] = typer.Option(None, "--out", help="DIR (accelerate.yaml, deepspeed.json) or FILE.yaml; "
                                       "default: print them"),
    config_file: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file with the flags' keys"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    training: dict = None,
):
    """The accelerate config (and DeepSpeed JSON) for --distributed on N GPUs x M machines, and the commands that
    launch it with accelerate launch or torchrun."""
    from memfit.distributed import launch

    file_values = read_config_file(config_file)
    config = build_config(training, file_values)
    model, data = model or file_values.get("model"), data or file_values.get("data")
    output_dir = output_dir or file_values.get("output_dir")
    model_config = None
    if model and config.distributed == "fsdp":
        from memfit.models import resolve_model

        try:
            model_config = resolve_model(model, fetch_config=True).config
        except UserError:
            pass  # the model may be only on the cluster: the layer class is then read from it when training starts
    paths = launch.output_paths(out.resolve()) if out is not None else None
    plan = launch.plan_launch(
        config, training, {"model": model, "data": data, "output_dir": output_dir, "config_file": config_file},
        num_processes=num_processes, num_machines=num_machines, machine_rank=machine_rank,
        main_process_ip=main_process_ip, main_process_port=main_process_port, model_config=model_config,
        deepspeed_file=str(paths.deepspeed_json) if paths else launch.DEEPSPEED_FILE)
    files = launch.write_plan(plan, paths) if paths else None
    accelerate_file = str(files.accelerate_yaml) if files else launch.ACCELERATE_FILE
    if as_json:
        return _print_json(launch.to_json(plan, files, accelerate_file))
    sys.stdout.write(launch.render_text(plan, files, accelerate_file))


# The demo: the tiny llama (1M weights, random init), every weight trained, the built-in dataset, about a minute on
# 2 CPU cores. Not LoRA: a random-init base's frozen tied head (std 0.02 over 128 dims, after a unit RMS norm) caps
# its logits near +-2.6, so adapters alone barely move the loss; benchmarks/demo_learning.py measures both
# (docs/benchmarks.md, "Does the demo learn?").
# Gradient checkpointing off: a 1M-weight model's activations are small, and the demo is about a minute.
DEMO_DEFAULTS = dict(method="full", seq_len=128, batch_size=8, grad_accum=1, lr=3e-3, warmup_steps=5,
                     max_steps=400, memory_report_interval=200, save_every=100, seed=0, grad_checkpointing=False)
# A sentence the built-in data has (demo.jsonl line 2): after training the model should go on with its words.
DEMO_PROMPT = "A prime number is"


@app.command()
@training_flags(include_guard=True, defaults=DEMO_DEFAULTS)
def demo(
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="run dir (default runs/demo-<time>)"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or mps (default: the best this machine has)"),
    prompt: str = typer.Option(DEMO_PROMPT, "--prompt", help="text the model continues before and after training"),
    training: dict = None,
):
    """Train the built-in tiny model on the built-in dataset, guard on, in about a minute; show a greedy
    continuation of --prompt before and after."""
    import time
    from importlib import resources

    from memfit.api import train as run_train
    from memfit.eval.sample import continue_prompt
    from memfit.models import init_model
    from memfit.paths import cache_dir
    from memfit.render import TrainRenderer
    from memfit.runtime import default_device
    from memfit.train.rundir import FINAL

    check_device(device)
    model_dir = cache_dir() / "models" / "tiny"
    if not (model_dir / "config.json").exists():
        console.print(f"building the tiny demo model in {model_dir} (memfit init-model --preset tiny)")
        init_model("tiny", model_dir)
    options = {**DEMO_DEFAULTS, **training}
    config = make_config(**options)
    output_dir = output_dir or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    sample_device = device or default_device()
    before = continue_prompt(model_dir, prompt, device=sample_device)
    with resources.as_file(resources.files("memfit").joinpath("data/demo.jsonl")) as data:
        console.print(f"demo: {config.method} fine-tune of {model_dir} with {data.name} ({config.loss} loss), "
                      f"run dir {output_dir}", soft_wrap=True)
        renderer = TrainRenderer(console)
        try:
            exit_code = run_train(str(model_dir), data, output_dir, device=device, on_event=renderer,
                                  **options).exit_code
        finally:
            renderer.close()
    final = output_dir / FINAL
    if exit_code == 0 and final.is_dir():
        trained = (continue_prompt(model_dir, prompt, adapter=final, device=sample_device) if config.method != "full"
                   else continue_prompt(final, prompt, device=sample_device))
        console.print(f"before training: {escape(prompt)} [dim]{escape(before)}[/dim]", soft_wrap=True, highlight=False)
        console.print(f"after training:  {escape(prompt)} [bold]{escape(trained)}[/bold]", soft_wrap=True, highlight=False)
    raise typer.Exit(exit_code)


@app.command()
def report(
    path: Path = typer.Argument(..., help="a run directory (train --output-dir) or a probe profile JSON"),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="HTML file to write (default RUN_DIR/report.html, or PROFILE.html)"),
):
    """One self-contained HTML report (plots inline, opens offline) of a training run or a probe profile."""
    from memfit.report import write_report

    console.print(f"report: {write_report(path, out)}", soft_wrap=True, highlight=False)


@app.command("eval")
def eval_command(
    model: str = typer.Option(..., "--model", "-m", help="local dir, HF id in the HF cache, or alias"),
    data: Path = typer.Option(..., "--data", "-d", help="JSONL: text, prompt+completion or messages (loss); or "
                              "code tasks with \"prompt\" and \"tests\" (with --generate)"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="a PEFT adapter dir (a run's final/, or the run "
                                           "dir); with --engine mlx, an MLX run's final/ (mlx-lm's format)"),
    batch_size: int = typer.Option(8, "--batch-size", help="samples per forward pass / generate call"),
    seq_len: int = typer.Option(2048, "--seq-len", help="tokens per sample scored (longer samples are cut)"),
    dtype: str = typer.Option("auto", "--dtype", help="auto, bf16, fp16 or fp32"),
    quant: str = typer.Option("none", "--quant", help="none, 8 or 4: load the base quantized (as QLoRA trained it)"),
    max_memory: Optional[float] = typer.Option(None, "--max-memory", help="guard limit in GB (default: 80% of available)"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or mps (default: the best this machine has)"),
    generate: bool = typer.Option(False, "--generate", help="generate completions for the prompts instead of a loss"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="tokens generated per prompt at most"),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy; above: sampling at that temperature"),
    seed: int = typer.Option(0, "--seed", help="sampling seed"),
    timeout: float = typer.Option(10.0, "--timeout", help="seconds each code task's program may run (wall clock)"),
    allow_unsandboxed: bool = typer.Option(False, "--allow-unsandboxed",
                                           help="run generated code even where no sandbox can be made (unsafe)"),
    out: Optional[Path] = typer.Option(None, "--out", help="per-sample results as JSONL"),
    engine: str = typer.Option("torch", "--engine", help="torch, mlx (loss and perplexity with MLX: the base and "
                               "an MLX run's adapter, as it trained) or auto (MLX on Apple Silicon)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """Loss and perplexity on a JSONL (base model or base + adapter), or generated completions; code tasks' tests
    run only inside a sandbox (pass@1)."""
    from memfit.eval import EvalJob, run_eval
    from memfit.eval.render import EvalRenderer

    job = EvalJob(model=model, data=data, adapter=adapter, device=device, dtype=dtype, quant=quant,
                  batch_size=batch_size,
                  seq_len=seq_len, max_memory=max_memory, generate=generate, max_new_tokens=max_new_tokens,
                  temperature=temperature, seed=seed, timeout_s=timeout, allow_unsandboxed=allow_unsandboxed,
                  out=out, engine=engine)
    renderer = EvalRenderer(Console(stderr=True) if as_json else console)
    try:
        result = run_eval(job, on_event=renderer)
    finally:
        renderer.close()
    if as_json:
        _print_json(result.summary)
    raise typer.Exit(result.exit_code)


_RESUME_LATEST = "latest"


def _expand_bare_resume(argv: list[str]) -> list[str]:
    """`--resume` may stand alone (the newest checkpoint of --output-dir): give it a value click can parse."""
    expanded = []
    for index, arg in enumerate(argv):
        expanded.append(arg)
        following = argv[index + 1] if index + 1 < len(argv) else None
        if arg == "--resume" and (following is None or following.startswith("-")):
            expanded.append(_RESUME_LATEST)
    return expanded


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: run the app and turn every expected failure into one line and an exit code."""
    start_process()
    argv = _expand_bare_resume(list(sys.argv[1:] if argv is None else argv))
    try:
        # standalone_mode=False: click returns a command's typer.Exit code instead of raising it.
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int):
            return code
    except MemfitError as error:
        from memfit.distributed.ranks import current

        ranks = current()
        # Under torchrun every rank checks the same input: rank 0 says what is wrong; another rank speaks only of
        # what is its own (out of memory, a full disk).
        if ranks.is_main:
            sys.stderr.write(f"memfit: error: {error_line(error)}\n")
        elif type(error) is not UserError:  # its subclasses DiskFullError, OutOfMemoryError are per rank
            sys.stderr.write(f"memfit: error (rank {ranks.rank}): {error_line(error)}\n")
        return error.exit_code
    except typer.Exit as exit_:
        return exit_.exit_code
    except typer.Abort:
        sys.stderr.write("memfit: interrupted\n")
        return EXIT_INTERRUPTED
    except _usage_errors() as error:
        message = " ".join(error.format_message().split())
        option = getattr(getattr(error, "param", None), "opts", None)
        if option and option[0] not in message:
            message = f"{option[0]}: {message}"
        sys.stderr.write(f"memfit: error: {message} (see --help)\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("memfit: interrupted\n")
        return EXIT_INTERRUPTED
    return 0


def _usage_errors() -> tuple[type[Exception], ...]:
    """Click's usage errors: typer >= 0.26 vendors its own click, older typer uses the click package."""
    errors: list[type[Exception]] = []
    try:
        from typer._click.exceptions import ClickException

        errors.append(ClickException)
    except ImportError:
        pass
    try:
        import click

        errors.append(click.ClickException)
    except ImportError:
        pass
    return tuple(errors)


def run() -> None:
    code = main()
    from memfit.distributed.ranks import current

    if current().distributed:
        # A torchrun worker ends here with its files written and its process group destroyed
        # (memfit.distributed.collective.leave). Interpreter shutdown then destroys torch's C++ objects, where a gloo
        # thread still joinable aborted a finished rank ("terminate called without an active exception", SIGABRT:
        # CI, 2026-12-05, after "finished 3 steps"), and torchrun reported the run failed. Exit without that shutdown
        # (memfit registers no atexit handler).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
