"""`memfit init-model`: write a random-init model of a built-in architecture that transformers loads offline.

Used for demos and tests without downloads. Big presets are refused unless forced: a random 8B model is tens of GB
of noise on disk and needs as much RAM to build.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from memfit.errors import UserError
from memfit.models.arch import arch_info
from memfit.models.registry import SMALL_PRESET_MAX_PARAMS, get_architecture
from memfit.models.tokenizer import IM_END, train_tokenizer

DTYPES = {"fp32": ("float32", 4), "bf16": ("bfloat16", 2), "fp16": ("float16", 2)}
INIT_MARKER = "memfit-init.json"  # records that the weights are random, and from which preset/seed


def _dtype_kwarg(torch_dtype: object) -> dict[str, object]:
    # transformers renamed torch_dtype to dtype in 4.56; the old name warns in 5.x.
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": torch_dtype} if (major, minor) >= (4, 56) else {"torch_dtype": torch_dtype}


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.is_file():
        raise UserError(f"--out {out_dir} is a file", "choose a directory path for the new model")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise UserError(
            f"--out {out_dir} already exists and is not empty",
            "choose another directory, or delete it first if you no longer need it",
        )


def init_model(
    preset: str,
    out_dir: Path,
    dtype: str = "fp32",
    force: bool = False,
    num_layers: int | None = None,
    seed: int = 0,
    overrides: dict | None = None,
) -> Path:
    """Write a random-init `preset` model (config, safetensors, tokenizer, generation config) to `out_dir`.
    `overrides`: config.json values to change (a smaller hidden size, fewer experts) for test and benchmark cuts."""
    out_dir = Path(out_dir).expanduser()
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}", f"use one of {', '.join(DTYPES)}")
    if num_layers is not None and num_layers < 1:
        raise UserError(f"--layers must be at least 1, got {num_layers}")
    arch = get_architecture(preset)
    _check_out_dir(out_dir)

    overrides = dict(overrides or {})
    tokenizer = train_tokenizer(overrides.get("vocab_size", arch.vocab_size))
    config = arch.to_hf_config(
        num_layers,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )
    params = _check_room(arch.name, config, dtype, force, out_dir)
    marker = {"preset": arch.name, "dtype": dtype, "num_layers": config.num_hidden_layers, "seed": seed,
              "params": params, "random_init": True, **({"overrides": overrides} if overrides else {})}

    # Built next to out_dir and renamed into place, so an interrupted run never leaves a half-written model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_model(tmp, config, tokenizer, dtype, seed, arch.max_position_embeddings)
        (tmp / INIT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above); rename cannot replace a directory on every platform
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _check_room(preset: str, config, dtype: str, force: bool, out_dir: Path) -> int:
    """The model's parameter count, once it is known to be small enough (or forced) and to fit on the disk of
    `out_dir` (whose parent is made here)."""
    _, bytes_per_param = DTYPES[dtype]
    params = arch_info(config).params
    size_gb = params * bytes_per_param / 1e9
    if params > SMALL_PRESET_MAX_PARAMS and not force:
        layers = config.num_hidden_layers
        raise UserError(
            f"preset {preset} with {layers} layers has {params:,} parameters: init-model would write "
            f"{size_gb:.1f} GB ({dtype}) and need about as much RAM",
            f"pass --force to do it anyway, or --layers N for a smaller copy "
            f"(the limit without --force is {SMALL_PRESET_MAX_PARAMS:,} parameters)",
        )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out_dir.parent).free
    if free < params * bytes_per_param * 1.05:
        raise UserError(
            f"not enough disk space in {out_dir.parent}: need {size_gb:.1f} GB, {free / 1e9:.1f} GB free",
            "free some space, choose another --out, or use --layers / --dtype bf16 for a smaller model",
        )
    return params


def _write_model(directory: Path, config, tokenizer, dtype: str, seed: int, max_length: int) -> None:
    """The random weights (seeded), their generation config and the tokenizer, saved into `directory`."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch_name, _ = DTYPES[dtype]
    torch.manual_seed(seed)
    # Parameters are created directly in the target dtype: no fp32 copy of a bf16 model in RAM.
    model = AutoModelForCausalLM.from_config(config, **_dtype_kwarg(getattr(torch, torch_name)))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)],  # stop at ChatML turn ends too
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(directory, safe_serialization=True)
    del model
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(directory)
