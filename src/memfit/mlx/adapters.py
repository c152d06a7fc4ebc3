"""Adapter files of an MLX run: mlx-lm's format, and a PEFT export of the same LoRA weights.

mlx-lm's format (`final/`): `adapters.safetensors` (the trainable tensors under the model's own paths,
`model.layers.0.self_attn.q_proj.lora_a`) and `adapter_config.json` (`fine_tune_type`, `num_layers`,
`lora_parameters`), loadable with `mlx_lm.load(model, adapter_path=final)` and `mlx_lm.generate`.

PEFT's format (`final/peft/`): `adapter_model.safetensors` and `adapter_config.json` for transformers + PEFT on the
same base. The conversion, per adapted linear at path P:
- `base_model.model.P.lora_A.weight` = mlx-lm's `lora_a` transposed: mlx-lm keeps (in, r) and computes x @ a @ b,
  PEFT keeps nn.Linear weights (r, in) and (out, r) and computes B(A(x));
- `base_model.model.P.lora_B.weight` = `lora_b` transposed;
- PEFT scales the product by lora_alpha / r; mlx-lm by its `scale`: lora_alpha = scale x r (memfit sets
  scale = alpha / r, so PEFT's lora_alpha is memfit's alpha).
Only LoRA on plain linear layers converts (DoRA's magnitude and mixture-of-experts switch layers are left out:
`export_peft` says so and writes nothing for them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from memfit.files import write_atomic

MLX_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_DIR = "peft"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str))


def save_mlx_adapters(directory: Path, model, adapter_config: dict[str, Any] | None, extra: dict[str, Any]) -> None:
    """adapters.safetensors + adapter_config.json in `directory` (mlx-lm's load_adapters reads them)."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(directory / MLX_WEIGHTS), weights)
    config = dict(extra)
    if adapter_config is None:  # a full fine-tune: mlx-lm's "full" type loads every saved weight
        config.update({"fine_tune_type": "full", "num_layers": len(model.layers), "lora_parameters": None})
    else:
        config.update(adapter_config)
    _write_json(directory / ADAPTER_CONFIG, config)


def peft_tensors(model) -> tuple[dict[str, mx.array], list[str], list[str]]:
    """(PEFT state dict, adapted module paths, what was left out) from a model with mlx-lm LoRA layers."""
    from mlx_lm.tuner.lora import LoRALinear

    tensors: dict[str, mx.array] = {}
    paths: list[str] = []
    skipped: list[str] = []
    for path, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, LoRALinear):
            tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = module.lora_a.T.astype(mx.float32)
            tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = module.lora_b.T.astype(mx.float32)
            paths.append(path)
        elif kind in ("DoRALinear", "LoRASwitchLinear", "DoRAEmbedding", "LoRAEmbedding"):
            skipped.append(f"{path} ({kind})")
    return tensors, paths, skipped


def peft_config(paths: list[str], adapter_config: dict[str, Any], layer_count: int, base: str) -> dict[str, Any]:
    """PEFT's adapter_config.json for the adapted `paths`: leaf names when every decoder layer is adapted (as a
    PEFT user writes it), the full module paths otherwise."""
    params = adapter_config["lora_parameters"]
    rank = int(params["rank"])
    if adapter_config["num_layers"] >= layer_count:
        targets = sorted({path.rsplit(".", 1)[-1] for path in paths})
    else:
        targets = sorted(paths)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": rank, "lora_alpha": float(params["scale"]) * rank, "lora_dropout": float(params["dropout"]),
        "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "revision": None,
    }


def export_peft(directory: Path, model, adapter_config: dict[str, Any] | None, base: str) -> list[str]:
    """Write a PEFT adapter into `directory`; returns notes (what could not be converted). Nothing is written for a
    full fine-tune or when no LoRA layer converts."""
    if adapter_config is None:
        return ["no PEFT export: a full fine-tune has no adapter (final/adapters.safetensors holds the weights)"]
    tensors, paths, skipped = peft_tensors(model)
    notes = []
    if skipped:
        notes.append(f"PEFT export leaves out {len(skipped)} layers PEFT's LoRA cannot express (e.g. {skipped[0]}); "
                     "they are in mlx-lm's adapter")
    if not tensors:
        return notes
    directory.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(directory / PEFT_WEIGHTS), tensors, metadata={"format": "pt"})
    _write_json(directory / ADAPTER_CONFIG, peft_config(paths, adapter_config, len(model.layers), base))
    return notes


def write_final(run_dir: Path, model, adapter_config: dict[str, Any] | None, tokenizer, *, base: str,
                extra: dict[str, Any], peft: bool = True) -> tuple[Path, list[str]]:
    """RUN_DIR/final/, whole or not at all (memfit.train.rundir.write_final swaps it in): mlx-lm's adapter, the
    tokenizer and (peft) the PEFT export in `final/peft/`. Returns the directory and notes."""
    from memfit.train.rundir import write_final as swap_in_final

    notes: list[str] = []

    def write(partial: Path) -> None:
        save_mlx_adapters(partial, model, adapter_config, extra)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(partial))
        if peft:
            notes.extend(export_peft(partial / PEFT_DIR, model, adapter_config, base))

    return swap_in_final(run_dir, write), notes
