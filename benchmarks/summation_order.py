"""Why 2 FSDP ranks and 1 process train adapters that differ element by element: float32 summation order, which
AdamW amplifies and SGD does not.

    python benchmarks/summation_order.py [--steps 8] [--write] [--out docs/benchmarks.md]

The tiny model (memfit init-model), LoRA r16, demo data at seq 64: 1 process with batch 4 against 2 torchrun ranks
(gloo, `--distributed fsdp`) with batch 2 each, the same rows per step, a checkpoint every step; once with AdamW and
once with SGD. For every step it reports the largest element difference of the trained adapters and the largest
per-tensor difference in norm, and for AdamW the gradient of the element that ends furthest apart, read back from
the optimizer's second moment (at step 2 a lora_A element's first gradient: exp_avg_sq = (1 - beta2) g^2).
This is the measurement behind tests/test_distributed.py's `assert_same_training`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

import torch
from estimate_accuracy import write_section  # benchmarks/ is on sys.path when run as a script
from safetensors.torch import load_file

from memfit.models import init_model

DATA = str(resources.files("memfit").joinpath("data/demo.jsonl"))


def train(model: Path, out: Path, optimizer: str, steps: int, ranks: int) -> None:
    flags = ["train", "--model", str(model), "--data", DATA, "--seq-len", "64", "--device", "cpu",
             "--max-steps", str(steps), "--save-every", "1", "--keep-checkpoints", str(steps + 1),
             "--optimizer", optimizer, "--output-dir", str(out), "--max-memory", "8"]
    if ranks == 1:
        command = [sys.executable, "-m", "memfit", *flags, "--batch-size", "4"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "memfit", *flags, "--batch-size", "2", "--distributed", "fsdp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run(command, check=True, env=env, capture_output=True)


def compare(one: Path, two: Path, step: int) -> tuple[float, str, int, float, float]:
    """Largest element difference (its tensor, flat index, value) and the largest per-tensor norm difference."""
    a = load_file(str(one / "checkpoints" / f"step-{step}" / "trainable.safetensors"))
    b = load_file(str(two / "checkpoints" / f"step-{step}" / "trainable.safetensors"))
    worst, worst_name, worst_index, worst_norm = 0.0, "", 0, 0.0
    for name in a:
        difference = (a[name] - b[name]).abs().flatten()
        index = int(difference.argmax())
        if difference[index] > worst:
            worst, worst_name, worst_index = float(difference[index]), name, index
        worst_norm = max(worst_norm, float(difference.norm() / a[name].norm().clamp_min(1e-30)))
    value = float(a[worst_name].flatten()[worst_index])
    return worst, worst_name, worst_index, value, worst_norm


def parameter_order(model: Path, names: list[str]) -> list[str]:
    """The adapters in the model's parameter order, which the optimizer's state indices follow (the safetensors
    file is sorted by name): the base model's modules on the meta device, lora_A before lora_B in each."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    position = {name: i for i, (name, _) in enumerate(base.named_modules())}

    def key(adapter: str) -> tuple[int, str]:
        module = adapter.removeprefix("base_model.model.").split(".lora_")[0]
        return position[module], adapter
    return sorted(names, key=key)


def gradients_at_step_2(run: Path, model: Path, name: str) -> torch.Tensor:
    """A lora_A tensor's gradient at step 2, from AdamW's moments (its gradient at step 1 is 0: lora_B starts at 0,
    so exp_avg_sq = (1 - beta2) g^2 and exp_avg has g's sign)."""
    names = parameter_order(model, list(load_file(str(run / "checkpoints" / "step-2" / "trainable.safetensors"))))
    state = torch.load(run / "checkpoints" / "step-2" / "optimizer.pt", weights_only=True)["state"][names.index(name)]
    return (state["exp_avg"].sign() * (state["exp_avg_sq"] / 1e-3).sqrt()).flatten()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="memfit-order-"))
    model = init_model("tiny", tmp / "tiny")
    lines = [f"Measured by `python benchmarks/summation_order.py --steps {args.steps} --write` (torch "
             f"{torch.__version__}): the tiny model, LoRA r16, seq 64; 1 process x batch 4 against 2 FSDP ranks (gloo) x "
             "batch 2, the same rows per step; the trained adapters compared after every step.",
             "", "| optimizer | step | largest element difference | where (value there) | largest tensor difference in norm |",
             "|---|---:|---:|---|---:|"]
    for optimizer in ("adamw", "sgd"):
        one, two = tmp / f"one-{optimizer}", tmp / f"two-{optimizer}"
        train(model, one, optimizer, args.steps, 1)
        train(model, two, optimizer, args.steps, 2)
        for step in range(1, args.steps + 1):
            worst, name, index, value, norm = compare(one, two, step)
            short = name.replace("base_model.model.model.", "").replace(".default", "")
            lines.append(f"| {optimizer} | {step} | {worst:.2e} | {short}[{index}] ({value:.2e}) | {norm:.1e} |")
            print(lines[-1], flush=True)
        if optimizer == "adamw":
            worst, name, index, value, _ = compare(one, two, args.steps)
            if "lora_A" in name:
                g_one, g_two = gradients_at_step_2(one, model, name), gradients_at_step_2(two, model, name)
                note = (f"AdamW: the element furthest apart got g = {g_one[index]:.2e} (1 process) and "
                        f"{g_two[index]:.2e} (2 ranks) at step 2, against a median |g| of "
                        f"{g_one.abs().median():.2e} in its tensor.")
                lines.insert(1, "\n" + note)
                print(note)
    body = "\n".join(lines) + "\n"
    print(body)
    if args.write:
        write_section(Path(args.out), "summation-order", "## 2 FSDP ranks vs 1 process: float32 summation order\n\n" + body)


if __name__ == "__main__":
    main()
