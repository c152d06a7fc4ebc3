"""The fused LoRA linear (memfit.train.lora_linear): the same outputs and gradients as PEFT's forward, and PEFT's
own path wherever the fused one does not apply."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from memfit.train.lora_linear import fuse_lora_linears


class TwoLinears(torch.nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.up = torch.nn.Linear(24, 40, bias=bias)
        self.down = torch.nn.Linear(40, 24, bias=bias)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(x)))


def peft_model(bias: bool = False, **lora) -> torch.nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(TwoLinears(bias), LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], **lora))
    for module in model.modules():  # B starts at zero in PEFT: give it values so its gradients flow both ways
        if hasattr(module, "lora_B"):
            for b in module.lora_B.values():
                torch.nn.init.normal_(b.weight, std=0.5)
    return model


def outputs_and_gradients(model: torch.nn.Module) -> list[torch.Tensor]:
    torch.manual_seed(1)
    x = torch.randn(3, 5, 24, requires_grad=True)
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    trained = [param.grad for param in model.parameters() if param.requires_grad]
    return [out.detach(), x.grad, *trained]


@pytest.mark.parametrize("bias", [False, True])
def test_fused_layers_give_peft_outputs_and_gradients(bias):
    reference = outputs_and_gradients(peft_model(bias))
    model = peft_model(bias)
    assert fuse_lora_linears(model) == 2
    fused = outputs_and_gradients(model)
    assert len(fused) == len(reference) == 2 + 4
    for mine, theirs in zip(fused, reference):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    assert all(param.grad is None for param in model.parameters() if not param.requires_grad)


def test_what_is_not_plain_lora_keeps_peft_forward():
    assert fuse_lora_linears(peft_model(lora_dropout=0.1)) == 0  # dropout: a copy of the input for A
    assert fuse_lora_linears(peft_model(use_dora=True)) == 0
    mixed = peft_model()
    mixed.base_model.model.up.lora_B["default"].to(torch.float64)  # dtypes differ: PEFT casts, so PEFT runs it
    assert fuse_lora_linears(mixed) == 1


def test_disabled_and_merged_adapters_run_peft_path():
    model = peft_model()
    fuse_lora_linears(model)
    x = torch.randn(2, 24)
    base = TwoLinears(False)
    weights = model.base_model.model.state_dict()
    base.load_state_dict({name.replace("base_layer.", ""): value
                          for name, value in weights.items() if "lora" not in name})
    with model.disable_adapter():
        torch.testing.assert_close(model(x), base(x))  # no LoRA term while disabled
    with_lora = model(x)
    assert not torch.allclose(with_lora, base(x))
    model.merge_adapter()
    torch.testing.assert_close(model(x), with_lora, rtol=1e-5, atol=1e-5)  # merged: the base layer alone, once
    model.unmerge_adapter()
    torch.testing.assert_close(model(x), with_lora)


def test_autocast_runs_peft_path():
    reference = peft_model()
    model = peft_model()
    fuse_lora_linears(model)
    x = torch.randn(4, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mine, theirs = model(x), reference(x)
    assert mine.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(mine, theirs)


def test_a_trained_model_gets_fused_layers(tiny_model_dir):
    from memfit.config import TrainConfig
    from memfit.precision import resolve_precision
    from memfit.train.model import load_model

    config = TrainConfig(method="lora", dtype="fp32")
    model = load_model(tiny_model_dir, config, resolve_precision("fp32", "cpu"), "cpu")
    layers = [module for module in model.modules() if hasattr(module, "lora_A")]
    assert layers and all("forward" in vars(layer) for layer in layers)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(layer.lora_A["default"].weight.grad is not None for layer in layers)


def test_an_adapter_added_after_fusing_runs_peft_path():
    reference, model = peft_model(), peft_model()
    fuse_lora_linears(model)
    for each in (reference, model):
        each.add_adapter("second", LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"]))
    x = torch.randn(4, 24)
    torch.testing.assert_close(model(x), reference(x))  # no crash on two adapters, and PEFT's result
