"""The estimator against measured reality: 3 real training steps in a child process, its own peak RSS (VmHWM)."""

import pytest
from transformers import AutoConfig

from memfit.config import TrainConfig
from memfit.estimate.measure import measure_in_child
from memfit.estimate.memory import GB, Hardware, estimate_memory

CASES = [
    ("tiny_model_dir", dict(method="full", dtype="fp32", batch_size=2, seq_len=256, grad_checkpointing=False)),
    ("smol_model_dir", dict(method="full", dtype="fp32", batch_size=2, seq_len=256, grad_checkpointing=False)),
    ("smol_model_dir", dict(method="lora", dtype="fp32", batch_size=4, seq_len=256, grad_checkpointing=False)),
    ("smol_model_dir", dict(method="lora", dtype="fp32", batch_size=4, seq_len=256, grad_checkpointing=True)),
]


@pytest.mark.parametrize("fixture, case", CASES)
def test_estimate_within_15_percent_of_measured_peak(request, fixture, case):
    """Slow (20-55 s a case): each case trains the model for real in a fresh child to measure its peak RSS."""
    model_dir = request.getfixturevalue(fixture)
    measured = measure_in_child(model_dir, case, steps=3)["peak_rss_bytes"]
    estimate = estimate_memory(AutoConfig.from_pretrained(model_dir), TrainConfig(**case), Hardware("cpu", 16 * GB))
    error = (estimate.total_bytes - measured) / measured
    assert abs(error) <= 0.15, f"estimate {estimate.total_bytes / 2**20:.0f} MB vs measured {measured / 2**20:.0f} MB"


def test_loading_peak_of_a_converted_checkpoint(qwen_bf16_model_dir):
    """bf16 weights loaded for fp32 LoRA: the process peaks while loading, above its small training steps."""
    case = dict(method="lora", dtype="fp32", batch_size=1, seq_len=64)
    measured = measure_in_child(qwen_bf16_model_dir, case, steps=1)
    assert measured["load_peak_rss_bytes"] > measured["train_peak_rss_bytes"]
    estimate = estimate_memory(AutoConfig.from_pretrained(qwen_bf16_model_dir), TrainConfig(**case),
                               Hardware("cpu", 16 * GB))
    assert estimate.load_peak_bytes == estimate.total_bytes
    error = (estimate.load_peak_bytes - measured["load_peak_rss_bytes"]) / measured["load_peak_rss_bytes"]
    assert abs(error) <= 0.15, f"loading: estimate {estimate.load_peak_bytes / 2**20:.0f} MB vs measured " \
                               f"{measured['load_peak_rss_bytes'] / 2**20:.0f} MB"
