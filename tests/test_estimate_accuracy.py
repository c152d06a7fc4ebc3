"""The estimator against measured reality: 3 real training steps in a child process, its own peak RSS (VmHWM).

The published target is 10% on the model-dependent part of the peak (peak - the process baseline, whose constants
benchmarks/derive_constants.py measures), held where that part dominates: smollm2-135m at its whole depth (30 layers,
135M params). On smaller cuts the baseline is most of the peak, so they are held on the whole peak."""

import pytest
from transformers import AutoConfig

from memfit.config import TrainConfig
from memfit.estimate.measure import measure_in_child
from memfit.estimate.memory import GB, Hardware, estimate_memory

CASES = [
    ("tiny_model_dir", dict(method="full", dtype="fp32", batch_size=2, seq_len=256, grad_checkpointing=False)),
    ("smol_model_dir", dict(method="lora", dtype="fp32", batch_size=4, seq_len=256, grad_checkpointing=True)),
]
# Whole smollm2-135m: the cheapest real steps whose tensors pass glibc's 1 MiB mmap threshold (memfit.allocator),
# as a training run's do. LoRA with gradient checkpointing is not here: it is under-estimated on the model part,
# for a reason the estimate does not model (docs/benchmarks.md, "Estimator accuracy"). The step's tensors under the
# 1 MiB threshold (at 2 x 128 tokens every hidden-sized activation, 590 KB) come from glibc's heap, and what the step
# frees there stays resident: at the peak of 2 x 128, 222 MB of a 428 MB heap was free; with a 64 KiB threshold
# 12 MB (`python benchmarks/heap_retention.py --write`).
WHOLE_CASES = [
    dict(method="full", dtype="fp32", batch_size=1, seq_len=128),
    dict(method="lora", dtype="fp32", batch_size=1, seq_len=512, grad_checkpointing=False),
]


@pytest.fixture(scope="module")
def smol_whole_model_dir(tmp_path_factory):
    """smollm2-135m's whole architecture (30 layers, 134.5M params, 538 MB in fp32): about 10 s to write."""
    from memfit.models import init_model

    return init_model("smollm2-135m", tmp_path_factory.mktemp("models") / "smol30")


@pytest.mark.parametrize("fixture, case", CASES)
def test_estimate_within_15_percent_of_measured_peak(request, fixture, case):
    """Slow (13 and 61 s at load 4-6 on 2 cores): each case trains the model for real in a fresh child."""
    model_dir = request.getfixturevalue(fixture)
    measured = measure_in_child(model_dir, case, steps=3)["peak_rss_bytes"]
    estimate = estimate_memory(AutoConfig.from_pretrained(model_dir), TrainConfig(**case), Hardware("cpu", 16 * GB))
    error = (estimate.total_bytes - measured) / measured
    assert abs(error) <= 0.15, f"estimate {estimate.total_bytes / 2**20:.0f} MB vs measured {measured / 2**20:.0f} MB"


@pytest.mark.parametrize("case", WHOLE_CASES)
def test_model_dependent_part_within_10_percent_on_a_135m_model(smol_whole_model_dir, case):
    """Slow: 3 steps of the whole 135M-param model in a fresh child, measured on 2 cores on 2026-12-03 at 46 s a case
    (load 2-3) and 110 s (load 4-6, other work sharing the cores), plus 4-24 s to write the model once. The
    error is (estimate - measured) / (measured - baseline): the same absolute error as on the whole peak, over the
    part the model makes."""
    measured = measure_in_child(smol_whole_model_dir, case, steps=3)["peak_rss_bytes"]
    estimate = estimate_memory(AutoConfig.from_pretrained(smol_whole_model_dir), TrainConfig(**case),
                               Hardware("cpu", 16 * GB))
    assert estimate.params >= 100_000_000
    baseline = estimate.baseline_bytes
    assert measured > 2 * baseline  # the model-dependent part dominates
    error = (estimate.process_bytes - measured) / (measured - baseline)
    assert abs(error) <= 0.10, (f"estimate {estimate.process_bytes / 2**20:.0f} MB vs measured "
                                f"{measured / 2**20:.0f} MB, baseline {baseline / 2**20:.0f} MB: {error:+.1%}")


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
