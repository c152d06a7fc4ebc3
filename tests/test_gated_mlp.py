"""The fused gated MLP (memfit.train.gated_mlp): transformers' outputs and gradients, bit for bit, with two of the
four intermediate-sized tensors saved for backward (three in full training); other MLPs keep their forward."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

from memfit.train.gated_mlp import fuse_gated_mlps
from memfit.train.lora_linear import fuse_lora_linears

INTERMEDIATE = 112


def tiny_llama(hidden_act: str = "silu", lora_targets: list[str] | None = None, mlp_bias: bool = False):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=INTERMEDIATE, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, hidden_act=hidden_act, mlp_bias=mlp_bias)
    model = LlamaForCausalLM(config)
    if lora_targets is None:  # full training
        return model
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=lora_targets))
    for module in model.modules():  # B starts at zero in PEFT: give it values so its gradients flow both ways
        if hasattr(module, "lora_B"):
            for b in module.lora_B.values():
                torch.nn.init.normal_(b.weight, std=0.5)
    fuse_lora_linears(model)
    return model


def loss_and_gradients(model: torch.nn.Module) -> list[torch.Tensor]:
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return [loss.detach()] + [param.grad for param in model.parameters() if param.requires_grad]


def saved_intermediates(model: torch.nn.Module) -> int:
    """How many distinct tensors of tokens x intermediate the forward pass saves for backward."""
    storages = set()
    weights = {param.untyped_storage().data_ptr() for param in model.parameters()}

    def pack(tensor):
        if tensor.dim() >= 2 and tensor.shape[-1] == INTERMEDIATE:
            storages.add(tensor.untyped_storage().data_ptr())
        return tensor

    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids).loss
    return len(storages - weights)


CASES = {
    "full training": dict(),
    "lora on every linear": dict(lora_targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"]),
    "lora on every MLP linear, with biases": dict(lora_targets=["gate_proj", "up_proj", "down_proj"], mlp_bias=True),
    "lora on gate/up, plain frozen down": dict(lora_targets=["gate_proj", "up_proj"]),
    "lora on down only": dict(lora_targets=["down_proj"]),
    "tanh gelu, lora on every linear": dict(hidden_act="gelu_pytorch_tanh",
                                            lora_targets=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]),
}


@pytest.mark.parametrize("case", CASES)
def test_fused_mlps_give_transformers_loss_and_gradients_bit_for_bit(case):
    reference = loss_and_gradients(tiny_llama(**CASES[case]))
    model = tiny_llama(**CASES[case])
    assert fuse_gated_mlps(model) == 2
    fused = loss_and_gradients(model)
    assert len(fused) == len(reference) > 1
    for mine, theirs in zip(fused, reference):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("case, unfused, fused", [
    ("full training", 4, 3),  # a, act(a), b, c (for down's weight gradient) -> a, b, c
    ("lora on every linear", 4, 2),  # c is recomputed for down's A
    ("lora on gate/up, plain frozen down", 3, 2),  # a frozen down keeps no input: a, act(a), b -> a, b
])
def test_fused_mlps_save_two_intermediate_tensors_per_layer(case, unfused, fused):
    layers = 2
    assert saved_intermediates(tiny_llama(**CASES[case])) == unfused * layers
    model = tiny_llama(**CASES[case])
    fuse_gated_mlps(model)
    assert saved_intermediates(model) == fused * layers


def test_mlps_not_handled_keep_their_forward():
    assert fuse_gated_mlps(tiny_llama(hidden_act="relu")) == 0  # an activation without a backward kernel here
    assert fuse_gated_mlps(tiny_llama(hidden_act="gelu_python_tanh")) == 0  # the Python formula, not aten's

    class ScaledMLP(LlamaMLP):  # a forward that does more than the gated product
        def forward(self, x):
            return 2 * self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    model = tiny_llama()
    for layer in model.model.layers:
        layer.mlp.__class__ = ScaledMLP
    assert fuse_gated_mlps(model) == 0


def test_a_merged_or_disabled_down_adapter_runs_its_own_forward():
    model = tiny_llama(lora_targets=["gate_proj", "up_proj", "down_proj"])
    fuse_gated_mlps(model)
    ids = torch.arange(9)[None]
    with torch.no_grad():
        with_lora = model(input_ids=ids).logits
        with model.disable_adapter():
            without = model(input_ids=ids).logits
        model.merge_adapter()
        merged = model(input_ids=ids).logits
    assert not torch.allclose(with_lora, without)
    torch.testing.assert_close(merged, with_lora, rtol=1e-5, atol=1e-5)  # the merged weight, LoRA not added twice
