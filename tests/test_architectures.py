"""Any causal LM transformers can build is estimated from its config alone; one that cannot be is one line.

benchmarks/architecture_sweep.py runs every model type of the installed transformers (docs/benchmarks.md); these
are a few representatives, with shapes cut down where the defaults are huge.
"""

import pytest
from transformers import AutoConfig

from memfit.config import TrainConfig
from memfit.errors import UserError
from memfit.estimate.memory import Hardware, estimate_memory

CUDA = Hardware("cuda", 80 * 1024**3)


def _config(model_type: str, **overrides):
    return AutoConfig.for_model(model_type, **overrides)


def test_a_model_type_with_no_builtin_is_estimated_experts_included():
    """gpt-oss: no built-in, experts stored transposed (in x out), with biases; counted as transformers builds it."""
    config = _config("gpt_oss", num_hidden_layers=4, hidden_size=512, intermediate_size=512, num_local_experts=8,
                     num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=4096,
                     layer_types=["sliding_attention", "full_attention"] * 2)
    estimate = estimate_memory(config, TrainConfig(method="lora", seq_len=256), CUDA)
    assert estimate.num_experts == 8 and estimate.experts_per_token == config.num_experts_per_tok
    assert estimate.active_params < estimate.params
    assert estimate.breakdown["activations"] > 0 and estimate.fits


def test_a_model_whose_step_cannot_be_traced_is_one_line():
    # mamba's mixer is no LoRA target PEFT knows: the same step would fail in training.
    with pytest.raises(UserError, match="cannot estimate model_type 'mamba'"):
        estimate_memory(_config("mamba", num_hidden_layers=2, hidden_size=256, vocab_size=1024),
                        TrainConfig(method="lora", seq_len=128), CUDA)


def test_a_model_without_gradient_checkpointing_says_what_to_pass():
    config = _config("ctrl", n_layer=2, n_embd=256, n_head=4, vocab_size=1024)
    with pytest.raises(UserError, match="does not support gradient checkpointing") as raised:
        estimate_memory(config, TrainConfig(method="lora", seq_len=128), CUDA)
    assert "--no-grad-checkpointing" in raised.value.hint
    assert estimate_memory(config, TrainConfig(method="lora", seq_len=128, grad_checkpointing=False), CUDA).fits
