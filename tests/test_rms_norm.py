"""The fused RMSNorm (memfit.train.rms_norm): transformers' output bit for bit, its gradients to rounding, fewer
tensors kept for backward; norms of another form keep their forward."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from memfit.train.rms_norm import fuse_rms_norms

WIDTH = 48


def norm_pair(cls=LlamaRMSNorm, dtype=torch.float32, weight_dtype=None, trains: bool = True):
    torch.manual_seed(0)
    reference = cls(WIDTH, eps=1e-5).to(weight_dtype or dtype)
    with torch.no_grad():
        reference.weight.normal_(1.0, 0.3)
    reference.weight.requires_grad_(trains)
    fused = cls(WIDTH, eps=1e-5).to(weight_dtype or dtype)
    fused.load_state_dict(reference.state_dict())
    fused.weight.requires_grad_(trains)
    holder = torch.nn.Sequential(fused)
    assert fuse_rms_norms(holder) == 1
    return reference, fused


def run(norm, x, grad):
    x = x.clone().requires_grad_()
    out = norm(x)
    out.backward(grad)
    return out, x.grad, norm.weight.grad


@pytest.mark.parametrize(("dtype", "weight_dtype", "trains"), [
    (torch.float32, None, True), (torch.float32, None, False), (torch.bfloat16, None, True),
    (torch.bfloat16, torch.float32, False),  # QLoRA with --qlora-upcast: fp32 norms over bf16 activations
])
def test_output_and_gradients_match_transformers(dtype, weight_dtype, trains):
    reference, fused = norm_pair(dtype=dtype, weight_dtype=weight_dtype, trains=trains)
    x = torch.randn(3, 7, WIDTH, generator=torch.Generator().manual_seed(1)).mul_(4).to(dtype)
    out_dtype = torch.result_type(reference.weight, x)
    grad = torch.randn(3, 7, WIDTH, generator=torch.Generator().manual_seed(2)).to(out_dtype)
    want, got = run(reference, x, grad), run(fused, x, grad)
    assert got[0].dtype == want[0].dtype and torch.equal(got[0], want[0])  # the same operations: bit for bit
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got[1], want[1], **tolerance)
    if trains:
        torch.testing.assert_close(got[2], want[2], **tolerance)
    else:
        assert got[2] is None and want[2] is None


def test_a_whole_model_trains_the_same():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    reference = LlamaForCausalLM(config)
    fused = LlamaForCausalLM(config)
    fused.load_state_dict(reference.state_dict())
    assert fuse_rms_norms(fused) == 5  # two per layer and the final one
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    results = []
    for model in (reference, fused):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    for want, got in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_keeps_fewer_tensors_for_backward():
    # bf16 input, frozen weight (LoRA): autograd keeps the fp32 copy of the input; the fused norm keeps the input.
    def kept_bytes(norm) -> int:
        storages = {}

        def pack(tensor):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        x = torch.randn(64, WIDTH, dtype=torch.bfloat16, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            norm(x)
        storages.pop(norm.weight.untyped_storage().data_ptr(), None)
        return sum(storages.values())

    reference, fused = norm_pair(dtype=torch.bfloat16, trains=False)
    assert kept_bytes(reference) >= 64 * WIDTH * 4  # the fp32 copy
    assert kept_bytes(fused) == 64 * WIDTH * 2 + 64 * 4  # the bf16 input and one fp32 statistic per token


def test_other_norms_keep_their_forward():
    qwen = torch.nn.Sequential(Qwen2RMSNorm(WIDTH))
    assert fuse_rms_norms(qwen) == 1  # a copy of LlamaRMSNorm
    gemma = torch.nn.Sequential(GemmaRMSNorm(WIDTH))  # (1 + weight): another formula
    assert fuse_rms_norms(gemma) == 0 and "forward" not in vars(gemma[0])

    class Scaled(LlamaRMSNorm):
        def forward(self, hidden_states):
            return super().forward(hidden_states) * 2

    assert fuse_rms_norms(torch.nn.Sequential(Scaled(WIDTH), torch.nn.LayerNorm(WIDTH))) == 0
