"""`memfit launch-config`: the accelerate config (and DeepSpeed JSON) for a run on N GPUs x M machines, and the exact
commands that launch it, so nobody hand-writes either.

The YAML is the schema `accelerate launch --config_file` reads (accelerate.commands.config.config_args.ClusterConfig).
It tells the launcher how many processes to start, where, and which engine's variables to set; the training
process itself builds its engine from its own flags (memfit.distributed.engines.accelerator_kwargs for DeepSpeed;
FSDP it applies itself, memfit.distributed.fsdp, with the settings the YAML's fsdp_config records), and those flags
are in the printed command, so a YAML launch and a plain torchrun launch train the same way.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from memfit.config import TrainConfig, flag_name
from memfit.distributed import engines
from memfit.errors import UserError
from memfit.precision import resolve_precision

DEFAULT_PORT = 29500
ACCELERATE_FILE = "accelerate.yaml"
DEEPSPEED_FILE = "deepspeed.json"
# Where the printed command has no value of the user's (launch-config does not need the model or the data).
PLACEHOLDERS = {"--model": "MODEL", "--data": "DATA.jsonl", "--output-dir": "OUTPUT_DIR"}
NODE_RANK = "$NODE_RANK"
# The accelerate YAML keys of `engines.fsdp_settings` (accelerate's launcher turns them into FSDP_* variables).
_FSDP_YAML_KEYS = {
    "fsdp_version": "fsdp_version",
    "reshard_after_forward": "fsdp_reshard_after_forward",
    "auto_wrap_policy": "fsdp_auto_wrap_policy",
    "transformer_cls_names_to_wrap": "fsdp_transformer_layer_cls_to_wrap",
    "cpu_offload": "fsdp_offload_params",
    "state_dict_type": "fsdp_state_dict_type",
    "cpu_ram_efficient_loading": "fsdp_cpu_ram_efficient_loading",
    "activation_checkpointing": "fsdp_activation_checkpointing",
}


@dataclass
class LaunchPlan:
    """What to write and what to run for one training config on `processes_per_machine` x `num_machines`."""

    engine: str  # ddp | fsdp | deepspeed
    distributed: str  # the --distributed value (auto, ddp, fsdp, zero1..3)
    processes_per_machine: int
    num_machines: int
    machine_rank: int
    main_process_ip: str | None
    main_process_port: int
    precision: str
    accelerate_config: dict[str, Any]
    deepspeed_config: dict[str, Any] | None
    train_args: list[str]  # what follows `memfit train` in every command
    notes: list[str] = field(default_factory=list)

    @property
    def num_processes(self) -> int:
        return self.processes_per_machine * self.num_machines


@dataclass(frozen=True)
class LaunchFiles:
    accelerate_yaml: Path | None
    deepspeed_json: Path | None


def default_processes() -> int:
    """The GPUs of this machine (a launch config is usually written on a node of the cluster it is for), else 1."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def _check_topology(processes: int, machines: int, machine_rank: int, ip: str | None, port: int) -> None:
    if processes < 1:
        raise UserError(f"--num-processes must be >= 1 (got {processes})", hint="the GPUs per machine")
    if machines < 1:
        raise UserError(f"--num-machines must be >= 1 (got {machines})")
    if not 0 <= machine_rank < machines:
        raise UserError(f"--machine-rank must be 0..{machines - 1} (got {machine_rank})",
                        hint="0 on the main machine, then 1, 2, ...")
    if not 1 <= port <= 65535:
        raise UserError(f"--main-process-port must be 1..65535 (got {port})")
    if machines > 1 and not ip:
        raise UserError(f"--num-machines {machines} needs --main-process-ip: the address of machine 0 that the "
                        "others connect to", hint="e.g. --main-process-ip 10.0.0.1")


def _flag_args(name: str, value: Any) -> list[str]:
    if isinstance(value, bool):
        return [flag_name(name) if value else f"--no-{name.replace('_', '-')}"]
    return [flag_name(name), str(value)]


def train_arguments(config: TrainConfig, given: dict[str, Any], job: dict[str, Any]) -> list[str]:
    """`memfit train`'s arguments: the job's (--model, --data, --output-dir, -c: placeholders where not given), the
    training flags given, and the engine flags always (so the command is right even when they came from -c)."""
    args: list[str] = []
    for flag, placeholder in PLACEHOLDERS.items():
        key = flag.lstrip("-").replace("-", "_")
        args += [flag, str(job.get(key) or placeholder)]
    if job.get("config_file"):
        args += ["-c", str(job["config_file"])]
    flags = dict(given)
    flags["distributed"] = config.distributed
    if config.offload != "none" or "offload" in given:
        flags["offload"] = config.offload
    for name, value in flags.items():
        args += _flag_args(name, value)
    return args


def accelerate_config(config: TrainConfig, plan_engine: str, *, processes: int, machines: int, machine_rank: int,
                      ip: str | None, port: int, mixed_precision: str, fsdp: dict[str, Any] | None,
                      deepspeed_file: str | None) -> dict[str, Any]:
    """The YAML's content. For DeepSpeed it holds no precision, batch or ZeRO key of its own: with a
    `deepspeed_config_file`, accelerate refuses those (they would be ignored), and the JSON holds them all."""
    data: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed": "DEEPSPEED"}[plan_engine],
        "num_machines": machines,
        "machine_rank": machine_rank,
        "num_processes": processes * machines,  # accelerate's is the total; its launcher divides by machines
        "gpu_ids": "all",
        "rdzv_backend": "static",
        "main_process_port": port,
        "use_cpu": False,
        "debug": False,
        "downcast_bf16": "no",
        "enable_cpu_affinity": False,
        "main_training_function": "main",
    }
    if machines > 1:
        data["main_process_ip"] = ip  # accelerate's launcher: torchrun's static rendezvous at ip:port
    if plan_engine == "deepspeed":
        data["deepspeed_config"] = {
            "deepspeed_config_file": deepspeed_file,
            "zero3_init_flag": engines.zero_stage(config) == 3,
            # torchrun on each node, started by the user: no pdsh, no hostfile, no ssh between nodes.
            "deepspeed_multinode_launcher": "standard",
        }
    else:
        data["mixed_precision"] = mixed_precision
    if plan_engine == "fsdp":
        fsdp_yaml = {}
        for key, value in (fsdp or {}).items():
            if key == "auto_wrap_policy":
                value = str(value).upper()
            if key == "transformer_cls_names_to_wrap":
                if not value:
                    continue  # accelerate then wraps the loaded model's _no_split_modules
                value = ",".join(value)
            fsdp_yaml[_FSDP_YAML_KEYS[key]] = value
        data["fsdp_config"] = fsdp_yaml
    return data


def plan_launch(config: TrainConfig, given: dict[str, Any], job: dict[str, Any], *, num_processes: int | None = None,
                num_machines: int = 1, machine_rank: int = 0, main_process_ip: str | None = None,
                main_process_port: int = DEFAULT_PORT, model_config=None,
                deepspeed_file: str = DEEPSPEED_FILE) -> LaunchPlan:
    """The plan for `config` (its flags as `given`, the job's --model/--data/--output-dir/-c in `job`). Raises
    UserError for a topology or engine combination that cannot run; DeepSpeed need not be installed here."""
    processes = default_processes() if num_processes is None else num_processes
    _check_topology(processes, num_machines, machine_rank, main_process_ip, main_process_port)
    world = processes * num_machines
    engines.check_combination(config, "cuda", world)
    engine = engines.engine_name(config)
    precision = resolve_precision(config.dtype, "cuda")
    notes: list[str] = []
    fsdp = engines.fsdp_settings(config, precision, model_config) if engine == "fsdp" else None
    if fsdp is not None and not fsdp["transformer_cls_names_to_wrap"]:
        notes.append("FSDP wraps the model's decoder layers (its _no_split_modules), read when training starts; "
                     "a --model found here names them in the YAML")
    ds = engines.deepspeed_config(config, precision, world) if engine == "deepspeed" else None
    if ds is not None and not engines.deepspeed_installed():
        notes.append(f"DeepSpeed is not installed here; every node needs it: {engines.DEEPSPEED_EXTRA}")
    if world == 1:
        notes.append("1 process: nothing is distributed; pass --num-processes N (GPUs per machine)")
    if config.distributed == "auto":
        notes.append("--distributed auto is DDP: every GPU holds the whole model (fsdp or zero1-3 shard it)")
    accelerate = accelerate_config(config, engine, processes=processes, machines=num_machines,
                                   machine_rank=machine_rank, ip=main_process_ip, port=main_process_port,
                                   mixed_precision=precision.accelerate_mixed_precision, fsdp=fsdp,
                                   deepspeed_file=deepspeed_file if ds is not None else None)
    return LaunchPlan(engine=engine, distributed=config.distributed, processes_per_machine=processes,
                      num_machines=num_machines, machine_rank=machine_rank, main_process_ip=main_process_ip,
                      main_process_port=main_process_port, precision=precision.name, accelerate_config=accelerate,
                      deepspeed_config=ds, train_args=train_arguments(config, given, job), notes=notes)


def output_paths(out: Path) -> LaunchFiles:
    """`--out DIR` holds accelerate.yaml and deepspeed.json; `--out FILE.yaml` names the YAML, the JSON beside it."""
    if out.suffix.lower() in (".yaml", ".yml"):
        return LaunchFiles(out, out.with_name(f"{out.stem}.{DEEPSPEED_FILE}"))
    return LaunchFiles(out / ACCELERATE_FILE, out / DEEPSPEED_FILE)


def write_plan(plan: LaunchPlan, paths: LaunchFiles) -> LaunchFiles:
    """Write the YAML (and the JSON for DeepSpeed). The plan's YAML must name `paths.deepspeed_json` already."""
    target = paths.accelerate_yaml
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        written_json = None
        if plan.deepspeed_config is not None:
            paths.deepspeed_json.write_text(json.dumps(plan.deepspeed_config, indent=2) + "\n")
            written_json = paths.deepspeed_json
        target.write_text(accelerate_yaml(plan))
    except OSError as error:
        raise UserError(f"cannot write the launch config to {target.parent}: {error.strerror or error}",
                        hint="pass a writable --out DIR or FILE.yaml") from None
    return LaunchFiles(target, written_json)


def accelerate_yaml(plan: LaunchPlan) -> str:
    return yaml.safe_dump(plan.accelerate_config, sort_keys=False)


def _command(parts: list[str]) -> str:
    return " ".join(part if part == NODE_RANK else shlex.quote(part) for part in parts)


def commands(plan: LaunchPlan, accelerate_file: str) -> dict[str, str]:
    """The launch commands: accelerate with the YAML, and torchrun with nothing but flags. With several machines
    each is run on every machine, NODE_RANK set to 0 on the main one (--main-process-ip) and 1, 2, ... elsewhere."""
    train = ["-m", "memfit", "train", *plan.train_args]
    accelerate = ["accelerate", "launch", "--config_file", accelerate_file]
    torchrun = ["torchrun", "--nproc-per-node", str(plan.processes_per_machine)]
    if plan.num_machines > 1:
        accelerate += ["--machine_rank", NODE_RANK]
        torchrun += ["--nnodes", str(plan.num_machines), "--node-rank", NODE_RANK,
                     "--master-addr", str(plan.main_process_ip), "--master-port", str(plan.main_process_port)]
    elif plan.main_process_port != DEFAULT_PORT:
        torchrun += ["--master-port", str(plan.main_process_port)]
    return {"accelerate": _command(accelerate + train), "torchrun": _command(torchrun + train)}


def to_json(plan: LaunchPlan, files: LaunchFiles | None, accelerate_file: str) -> dict[str, Any]:
    """The `memfit launch-config --json` object."""
    return {
        "engine": plan.engine,
        "distributed": plan.distributed,
        "precision": plan.precision,
        "num_processes": plan.num_processes,
        "processes_per_machine": plan.processes_per_machine,
        "num_machines": plan.num_machines,
        "machine_rank": plan.machine_rank,
        "main_process_ip": plan.main_process_ip,
        "main_process_port": plan.main_process_port,
        "accelerate_config": plan.accelerate_config,
        "deepspeed_config": plan.deepspeed_config,
        "files": {"accelerate_yaml": str(files.accelerate_yaml) if files and files.accelerate_yaml else None,
                  "deepspeed_json": str(files.deepspeed_json) if files and files.deepspeed_json else None},
        "commands": commands(plan, accelerate_file),
        "notes": list(plan.notes),
    }


def render_text(plan: LaunchPlan, files: LaunchFiles | None, accelerate_file: str) -> str:
    """What `memfit launch-config` prints without --json: the files (or their content), then the commands."""
    lines: list[str] = []
    where = f"{plan.processes_per_machine} process(es) x {plan.num_machines} machine(s)"
    lines.append(f"# {plan.distributed} ({plan.engine}, {plan.precision}) on {where} = {plan.num_processes}")
    if files is not None:
        lines.append(f"# wrote {files.accelerate_yaml}" + (f" and {files.deepspeed_json}" if files.deepspeed_json
                                                            else ""))
    else:
        lines.append(f"# --- {accelerate_file} ---")
        lines.append(accelerate_yaml(plan).rstrip())
        if plan.deepspeed_config is not None:
            lines.append(f"# --- {plan.accelerate_config['deepspeed_config']['deepspeed_config_file']} ---")
            lines.append(json.dumps(plan.deepspeed_config, indent=2))
    launch = commands(plan, accelerate_file)
    if plan.num_machines > 1:
        others = "1 on the other" if plan.num_machines == 2 else f"1..{plan.num_machines - 1} on the others"
        lines.append(f"# on each of the {plan.num_machines} machines, with NODE_RANK=0 on {plan.main_process_ip} "
                     f"and {others}:")
    lines.append("# launch with accelerate:")
    lines.append(launch["accelerate"])
    lines.append("# or with torchrun (the same run; memfit sets the engine up from its flags):")
    lines.append(launch["torchrun"])
    lines.extend(f"# note: {note}" for note in plan.notes)
    return "\n".join(lines) + "\n"
