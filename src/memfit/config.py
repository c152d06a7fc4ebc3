"""Every training and guard option, declared once.

The CLI flags, the YAML keys, `run.json` and the estimator's inputs all derive from `TrainConfig`: a field's
`description` is its `--help` text, its bounds are the validation (mlx-lm's TrainingArgs does the same).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from memfit.errors import UserError

Method = Literal["full", "lora", "qlora"]
Quant = Literal["none", "8", "4"]
Dtype = Literal["auto", "bf16", "fp16", "fp32", "bf16-pure"]
Optimizer = Literal["adamw", "adamw8bit", "adafactor", "sgd"]
Loss = Literal["ce", "distrust"]
DistrustMode = Literal["add", "weight"]
Distributed = Literal["auto", "ddp", "fsdp", "zero1", "zero2", "zero3"]
Offload = Literal["none", "cpu"]


class TrainConfig(BaseModel):
    """Training flags shared by estimate, probe and train, and the guard flags of train."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # What is trained and how.
    method: Method = Field("lora", description="full fine-tune, LoRA adapters, or QLoRA (LoRA on a 4-bit base)")
    quant: Quant = Field("none", description="base-weight quantization: none, 8 or 4 bit (qlora implies 4)")
    # A k-bit base's other weights (embeddings, norms, lm_head) stay in the compute dtype, as torchtune, unsloth
    # and LitGPT keep them: PEFT's prepare_model_for_kbit_training casts them to fp32 (~2-3 GB more on an 8B
    # model); the losses stay within 1e-3 of the upcast run's (benchmarks/qlora_layout.py). The flag restores
    # that cast.
    qlora_upcast: bool = Field(
        False, description="with --quant 4/8: cast the unquantized weights (embeddings, norms, lm_head) to fp32, "
        "as PEFT's prepare_model_for_kbit_training does (off: they stay in the compute dtype)"
    )
    dtype: Dtype = Field(
        "auto",
        description="bf16/fp16: mixed precision (fp32 master weights and optimizer states); bf16-pure: everything "
        "in bf16; fp32; auto: bf16 where the hardware supports it, fp32 on CPU",
    )
    optimizer: Optimizer = Field("adamw", description="adamw, adamw8bit (bitsandbytes), adafactor or sgd")
    batch_size: int = Field(1, ge=1, le=65536, description="micro-batch size per device")
    grad_accum: int = Field(1, ge=1, le=65536, description="gradient accumulation steps")
    # The shared defaults (estimate, recommend, probe, train): what people fine-tune with. Sequences of 2048 tokens
    # (mlx-lm's and most axolotl recipes' length) and gradient checkpointing on (PEFT's
    # prepare_model_for_kbit_training turns it on for QLoRA, axolotl's LoRA/QLoRA/full recipes set it): without
    # it an 8B model's activations at seq 2048 outgrow a 24 GB card at batch 1. --no-grad-checkpointing trades
    # that memory for ~30% faster steps when the estimate shows room.
    seq_len: int = Field(2048, ge=1, le=1_048_576, description="sequence length in tokens")
    lora_rank: int = Field(16, ge=1, le=4096, description="LoRA rank r")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha (default 2 x rank)")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    lora_layers: int | None = Field(None, ge=1, description="adapt only the last N decoder layers (default all)")
    lora_targets: str = Field(
        "all-linear", description="comma-separated module names to adapt (q_proj,v_proj,...) or all-linear"
    )
    grad_checkpointing: bool = Field(True, description="recompute activations in backward to save memory "
                                                       "(--no-grad-checkpointing: faster steps, more memory)")
    attn_implementation: Literal["auto", "eager", "sdpa"] = Field(
        "auto", description="attention kernel: sdpa (memory-efficient where available) or eager"
    )
    # Schedule.
    lr: float = Field(2e-4, gt=0, description="peak learning rate")
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps before the cosine decay")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    epochs: float = Field(1.0, gt=0, description="passes over the data when --max-steps is not given")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm (0 turns it off)")
    seed: int = Field(0, ge=0, description="random seed")
    packing: bool | None = Field(None, description="pack short samples into seq-len blocks (default on for text)")
    group_by_length: bool = Field(
        True, description="without packing, batch rows of similar length together (less padding; order still seeded)"
    )
    # Speed and memory of the step (none of these changes what is learned).
    chunked_loss: bool = Field(
        True, description="cross-entropy chunk by chunk through the lm_head, never the full vocab-sized logits"
    )
    compile: bool = Field(False, description="torch.compile the model (pays off on CUDA; measured slower on CPU)")
    log_every: int | None = Field(
        None, ge=1, description="read the loss back from the device every N steps (default: about twice a second)"
    )
    # Many processes (memfit.distributed): what engine shards the run when it is launched with torchrun or
    # accelerate launch. One process ignores both.
    distributed: Distributed = Field(
        "auto", description="ddp, fsdp, or DeepSpeed zero1/zero2/zero3 when launched on several processes (auto: ddp)"
    )
    offload: Offload = Field("none", description="cpu: optimizer states (and zero3/fsdp weights) live in CPU RAM")
    # Loss.
    loss: Loss = Field("ce", description="ce, or distrust (the seeds' empirical distrust objective)")
    distrust_alpha: float = Field(2.7, ge=2.3, le=3.0, description="alpha of the distrust term")
    lambda_weight: float = Field(0.6, ge=0.0, description="weight of the distrust term")
    distrust_mode: DistrustMode = Field("weight", description="add (the seed's constant term) or weight (per sample)")
    # Guard.
    max_memory: float | None = Field(None, gt=0, description="hard memory limit in GB (default: 80% of available)")
    max_host_memory: float | None = Field(
        None, gt=0, description="on a GPU: host RAM limit in GB for this process's RSS (default: 80% of available RAM; "
                                "the run also stops when the machine's available RAM falls under a floor)")
    memory_threshold: float = Field(0.8, gt=0, le=1, description="fraction of the limit that warns")
    memory_report_interval: int = Field(100, ge=1, description="full memory report every N steps")
    save_every: int = Field(200, ge=1, description="checkpoint every N steps")
    keep_checkpoints: int = Field(3, ge=1, description="checkpoints kept on disk")
    memory_sample_interval: float = Field(
        0.1, ge=0, le=60, description="seconds between background memory reads (0: only at step ends)"
    )
    eval_every: int | None = Field(None, ge=1, description="validation loss every N steps (with --val-data)")
    tensorboard: bool = Field(False, description="also log loss, lr, tokens/s and memory to RUN_DIR/tensorboard "
                                                 "(needs `pip install tensorboard`)")
    # Supervision (memfit.train.supervisor).
    supervise: bool = Field(False, description="train in a child process that is restarted from its checkpoint "
                                               "when it dies (OOM-killed, crashed, stopped at the limit)")
    max_restarts: int = Field(3, ge=0, description="with --supervise: restarts allowed before giving up")
    reload_interval: int | None = Field(
        None, ge=1, description="with --supervise: restart the child from its checkpoint every N steps (a leaking "
                                "framework's memory goes back to the OS)")

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.method == "qlora" and self.quant == "none":
            # qlora means a quantized base; 4-bit nf4 unless --quant 8 asks otherwise.
            object.__setattr__(self, "quant", "4")
        if self.method != "qlora" and self.quant != "none" and self.method == "full":
            raise ValueError("--quant needs --method lora or qlora: quantized base weights cannot be fully trained")
        return self

    def updated(self, **changes: Any) -> "TrainConfig":
        """A validated copy with `changes` applied (model_copy skips validation, so qlora would keep quant none)."""
        return TrainConfig(**{**self.model_dump(), **changes})

    @property
    def effective_lora_alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank

    @property
    def uses_adapters(self) -> bool:
        return self.method in ("lora", "qlora")


def saved_config_values(saved: dict[str, Any]) -> dict[str, Any]:
    """A config read back from a checkpoint or run.json, with the keys an older memfit did not write set to what
    that memfit did. Where that is today's default, nothing is needed; where the default changed with the key:
    - `qlora_upcast`: memfit before the key always ran a k-bit base through PEFT's prepare_model_for_kbit_training
      (fp32 embeddings, norms, lm_head), so such a checkpoint resumes with that layout (True), exactly as it
      trained. A run without a k-bit base keeps the default (the key changes nothing there)."""
    values = dict(saved)
    if "qlora_upcast" not in values and (values.get("method") == "qlora" or values.get("quant", "none") != "none"):
        values["qlora_upcast"] = True
    return values


# Options only `train` takes (the memory guard, checkpoints, validation); estimate and probe share the rest.
GUARD_FIELDS = frozenset({"max_memory", "max_host_memory", "memory_threshold", "memory_report_interval", "save_every",
                          "keep_checkpoints",
                          "memory_sample_interval", "eval_every", "supervise", "max_restarts", "reload_interval",
                          "tensorboard"})


# Options that change no memory (the schedule, the seed, data order, logging, the loss's weights): the read
# commands (estimate, recommend) keep them out of their --help, and still take them (a flag copied from a train
# command, a key of a -c file). tests/test_config_defaults.py checks them against the estimator's NOT_TRACED.
NO_MEMORY_FIELDS = frozenset({"lr", "warmup_steps", "max_steps", "epochs", "max_grad_norm", "seed", "packing",
                              "group_by_length", "compile", "log_every", "lora_alpha"})


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _explain(error: ValidationError) -> str:
    """One line for the first problem pydantic found, in terms of the flag the user typed."""
    problem = error.errors()[0]
    location = problem.get("loc") or ()
    where = flag_name(str(location[0])) if location else "config"
    value = problem.get("input")
    kind = problem.get("type", "")
    if kind == "literal_error":
        choices = problem.get("ctx", {}).get("expected", "")
        return f"unknown {where} {value!r}: choose one of {choices}"
    if kind == "extra_forbidden":
        known = ", ".join(sorted(TrainConfig.model_fields))
        return f"unknown option {where.lstrip('-').replace('-', '_')!r} in config; known keys: {known}"
    message = problem.get("msg", "invalid value").removeprefix("Value error, ")
    if kind == "value_error":
        return message
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        limit = next(iter(problem.get("ctx", {}).values()), "?")
        return f"{where} must be {bounds[kind]} {limit} (got {value!r})"
    return f"{where}: {message[0].lower() + message[1:]} (got {value!r})"


def make_config(**values: Any) -> TrainConfig:
    """Build a config from keyword values, turning validation errors into one-line UserErrors."""
    try:
        return TrainConfig(**values)
    except ValidationError as error:
        raise UserError(_explain(error), hint="see the command's --help for allowed values") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file; keys are the flag names with `_` (a `-` is accepted too)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise UserError(f"cannot read config {path}: {error.strerror or error}", hint="check the path") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(error, 'problem', error)})", hint="fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of option: value at the top level", hint="see examples/")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


# --- where a command's settings come from: a flag (or a library call's keyword) > the -c file > a checkpoint > a
# probe profile ---------------------------------------------------------------------------------------------------

# Keys a -c config file may hold besides the TrainConfig fields (the commands' own options).
JOB_KEYS = {"model", "data", "val_data", "output_dir", "device", "memory_gb", "num_gpus", "zero",
            "target_batch"}


def read_config_file(config_file: str | Path | None) -> dict[str, Any]:
    """The -c file's values ({} without one); an unknown key is a UserError."""
    values: dict[str, Any] = load_yaml(config_file) if config_file else {}
    unknown = sorted(set(values) - set(TrainConfig.model_fields) - JOB_KEYS)
    if unknown:
        raise UserError(f"{config_file}: unknown key {unknown[0]!r}",
                        hint="keys are the flag names with _ (see --help)")
    return values


def build_config(given: dict[str, Any], file_values: dict[str, Any],
                 base: dict[str, Any] | None = None) -> TrainConfig:
    """Config from, by rising priority: `base` (a checkpoint's config, or a probe profile's settings), the -c
    file's values, the options given."""
    values = dict(base or {})
    values.update({key: value for key, value in file_values.items() if key in TrainConfig.model_fields})
    values.update(given)
    return make_config(**values)


def option_value(given: Any, file_values: dict[str, Any], key: str, kind: type, default: Any = None) -> Any:
    """A command option: the value given when there is one, else the -c file's key (checked to be a `kind`), else
    `default`."""
    if given is not None:
        return given
    value = file_values.get(key, default)
    if value is None:
        return None
    try:
        if isinstance(value, (bool, list, dict)) or (kind is int and float(value) != int(float(value))):
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        what = {int: "a whole number", float: "a number"}.get(kind, "a string")
        raise UserError(f"config file key {key!r} must be {what} (got {value!r})", hint="fix the -c file") from None
