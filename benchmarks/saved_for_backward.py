"""What one decoder layer saves for backward: transformers + PEFT as they come, then with memfit's fused LoRA linears
(memfit/train/lora_linear.py), then with its fused gated MLP as well (memfit/train/gated_mlp.py), then with its
fused RMSNorm too (memfit/train/rms_norm.py): the last row of each method is what `memfit train` runs.

Each model is built from its preset's config (real widths, 2 layers, random init, fp32) and runs one forward pass
of `--tokens` tokens in one row; the figure is the bytes of the distinct tensors that the second decoder layer's
autograd graph saves, its input and the weights left out. Times the number of layers, it is what a step of the
whole model holds for backward on top of the weights (without gradient checkpointing). No timing here: the step's
time is `benchmarks/train_vs_hf.py`'s and `benchmarks/step_cost.py`'s.

    python benchmarks/saved_for_backward.py [--presets smollm2-135m,qwen2.5-0.5b,llama-3.2-1b] [--tokens 512] [--write]
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from estimate_accuracy import write_section  # noqa: E402

MARK = "saved-for-backward"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # all-linear


def build(preset: str, method: str, fused: tuple[str, ...]):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from memfit.models.registry import get_architecture
    from memfit.train.gated_mlp import fuse_gated_mlps
    from memfit.train.lora_linear import fuse_lora_linears
    from memfit.train.rms_norm import fuse_rms_norms

    torch.manual_seed(0)
    config = get_architecture(preset).to_hf_config(2)
    config.use_cache = False
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS))
        if "lora" in fused:
            fuse_lora_linears(model)
    else:
        model.requires_grad_(True)
    if "mlp" in fused:
        fuse_gated_mlps(model)
    if "norm" in fused:
        fuse_rms_norms(model)
    return model, config


def layer_saved_bytes(model, config, tokens: int) -> int:
    from memfit.models.arch import decoder_layers

    layer = decoder_layers(model)[1]
    weights = {param.untyped_storage().data_ptr() for param in model.parameters()}
    saved: dict[int, int] = {}  # storage address -> bytes
    inputs: set[int] = set()

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)

    def enter(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        inputs.add(hidden.untyped_storage().data_ptr())
        hooks.__enter__()

    layer.register_forward_pre_hook(enter, with_kwargs=True)
    layer.register_forward_hook(lambda *_: hooks.__exit__(None, None, None))
    ids = torch.randint(0, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids).logits.sum().backward()
    return sum(size for ptr, size in saved.items() if ptr not in weights and ptr not in inputs)


VARIANTS = [
    ("lora", (), "transformers + PEFT"),
    ("lora", ("lora",), "+ fused LoRA linears"),
    ("lora", ("lora", "mlp"), "+ fused gated MLP"),
    ("lora", ("lora", "mlp", "norm"), "+ fused RMSNorm (memfit)"),
    ("full", (), "transformers"),
    ("full", ("mlp",), "+ fused gated MLP"),
    ("full", ("mlp", "norm"), "+ fused RMSNorm (memfit)"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="smollm2-135m,qwen2.5-0.5b,llama-3.2-1b")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()

    from memfit.models.registry import get_architecture

    rows = []
    for preset in args.presets.split(","):
        layers = get_architecture(preset).to_hf_config(None).num_hidden_layers
        for method, fused, label in VARIANTS:
            model, config = build(preset, method, fused)
            per_layer = layer_saved_bytes(model, config, args.tokens)
            del model
            if not fused:
                baseline = per_layer
            rows.append(f"| {preset} | {method} | {label} | {per_layer / 1e6:,.1f} | {per_layer * layers / 1e6:,.0f} "
                        f"| {per_layer / baseline:.2f}× |")
            print(rows[-1], flush=True)
    import transformers
    import peft

    command = "python benchmarks/saved_for_backward.py" + (
        f" --presets {args.presets}" if args.presets != parser.get_default("presets") else "") + (
        f" --tokens {args.tokens}" if args.tokens != 512 else "") + " --write"
    body = "\n".join([
        "## What a decoder layer saves for backward",
        "",
        f"Measured with `{command}` ({platform.machine()} {platform.system()}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}). Each preset's real widths, 2 layers, "
        f"random init, fp32, one row of {args.tokens} tokens; LoRA r16 on every linear. Bytes of the distinct "
        "tensors the second decoder layer's autograd graph saves (its input and the weights left out); × layers is "
        "what the whole model holds for backward at that length without gradient checkpointing.",
        "",
        "| model | method | layers as | per layer (MB) | × all layers (MB) | vs transformers |",
        "|---|---|---|---:|---:|---:|",
        *rows,
    ]) + "\n"
    print(body)
    if args.write:
        write_section(HERE.parent / "docs" / "benchmarks.md", MARK, body)


if __name__ == "__main__":
    main()
