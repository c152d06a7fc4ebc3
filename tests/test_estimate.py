"""The estimator's arithmetic and solvers, on real architectures (meta device and fake tensors: no memory)."""


import pytest

from memfit.config import TrainConfig
from memfit.models.arch import arch_info
from memfit.estimate.memory import (
    GB,
    Hardware,
    estimate_memory,
    grad_accum_for,
    max_batch_size,
    optimizer_state_bytes,
    to_json,
)
from memfit.estimate.advice import suggestions
from memfit.models import ARCHITECTURES, resolve_model
from memfit.train.chunk_size import MIN_CHUNK_TOKENS

LLAMA_8B = ARCHITECTURES["llama-3.1-8b"].to_hf_config()


def static_bytes(estimate):
    return sum(estimate.breakdown[name] for name in ("weights", "adapters", "gradients", "optimizer"))


def test_llama_8b_params_exact():
    assert arch_info(LLAMA_8B).params == 8_030_261_248


def test_full_mixed_precision_adamw_is_16_bytes_per_param():
    config = TrainConfig(method="full", dtype="bf16", seq_len=128)
    estimate = estimate_memory(LLAMA_8B, config, Hardware("cuda", 80 * GB))
    assert static_bytes(estimate) / estimate.params == pytest.approx(16.0, abs=0.01)
    pure = estimate_memory(LLAMA_8B, config.model_copy(update={"dtype": "bf16-pure"}), Hardware("cuda", 80 * GB))
    assert static_bytes(pure) / pure.params == pytest.approx(8.0, abs=0.01)


@pytest.mark.parametrize("zero, bytes_per_param", [(1, 4 + 12 / 8), (2, 2 + 14 / 8)])
def test_zero_stages_partition_model_states(zero, bytes_per_param):
    config = TrainConfig(method="full", dtype="bf16", seq_len=128)
    estimate = estimate_memory(LLAMA_8B, config, Hardware("cuda", 80 * GB, num_gpus=8, zero=zero))
    assert static_bytes(estimate) / estimate.params == pytest.approx(bytes_per_param, rel=1e-3)


def test_zero3_on_8_gpus_divides_model_states_by_8():
    config = TrainConfig(method="full", dtype="bf16", seq_len=128)
    single = estimate_memory(LLAMA_8B, config, Hardware("cuda", 80 * GB, num_gpus=8, zero=1))
    sharded = estimate_memory(LLAMA_8B, config, Hardware("cuda", 80 * GB, num_gpus=8, zero=3))
    info = arch_info(LLAMA_8B)
    gathered = 2 * info.largest_layer_params * 2
    unsharded_states = 16 * info.params
    assert static_bytes(sharded) - gathered == pytest.approx(unsharded_states / 8, rel=1e-3)
    assert static_bytes(sharded) < static_bytes(single)


def test_lora_params_match_peft_on_a_real_model(tiny_model_dir):
    from memfit.precision import resolve_precision
    from memfit.train.model import load_model

    for targets, layers in (("all-linear", None), ("q_proj,v_proj", 2)):
        config = TrainConfig(method="lora", lora_rank=8, lora_targets=targets, lora_layers=layers, dtype="fp32")
        model = load_model(tiny_model_dir, config, resolve_precision("fp32", "cpu"))
        real = sum(p.numel() for p in model.parameters() if p.requires_grad)
        hf_config = resolve_model(str(tiny_model_dir)).config
        estimate = estimate_memory(hf_config, config, Hardware("cpu", 8 * GB))
        assert estimate.trainable_params == real


def test_qlora_weights_near_half_a_byte_for_linear_layers():
    config = TrainConfig(method="qlora", seq_len=256)
    estimate = estimate_memory(LLAMA_8B, config, Hardware("cuda", 24 * GB))
    info = arch_info(LLAMA_8B)
    not_quantized = (info.params - info.linear_weight_params) * 2  # bf16, the compute dtype (no --qlora-upcast)
    per_linear_weight = (estimate.breakdown["weights"] - not_quantized) / info.linear_weight_params
    assert 0.5 < per_linear_weight < 0.53


@pytest.mark.parametrize("name, expected", [
    ("adamw", 2 * 4 * 4096), ("sgd", 0), ("adafactor", (64 + 64) * 4), ("adamw8bit", 2 * (4096 + 16 * 4)),
])
def test_optimizer_state_bytes(name, expected):
    assert optimizer_state_bytes(name, [(64, 64)], 4) == expected


def test_activations_grow_with_batch_and_shrink_with_checkpointing():
    hardware = Hardware("cuda", 80 * GB)
    base = TrainConfig(method="lora", dtype="bf16", batch_size=1, seq_len=1024, grad_checkpointing=False)
    one = estimate_memory(LLAMA_8B, base, hardware)
    two = estimate_memory(LLAMA_8B, base.model_copy(update={"batch_size": 2}), hardware)
    checkpointed = estimate_memory(LLAMA_8B, base.model_copy(update={"grad_checkpointing": True}), hardware)
    assert two.breakdown["activations"] == pytest.approx(2 * one.breakdown["activations"], rel=0.05)
    assert checkpointed.breakdown["activations"] < one.breakdown["activations"] / 4


def test_chunked_loss_removes_the_logits_term():
    """Full logits (bf16 + fp32 copy + gradient) of Llama-3's 128k vocab vs the chunked loss through the head."""
    hardware = Hardware("cuda", 80 * GB)
    chunked = TrainConfig(method="lora", dtype="bf16", batch_size=1, seq_len=1024)
    full = chunked.model_copy(update={"chunked_loss": False})
    with_logits = estimate_memory(LLAMA_8B, full, hardware)
    without = estimate_memory(LLAMA_8B, chunked, hardware)
    assert with_logits.breakdown["logits"] >= 1024 * 128256 * (2 + 4)
    # At most one chunk of MIN_CHUNK_TOKENS tokens' logits (fp32, and its 16-bit matmul output) is left.
    assert without.breakdown["logits"] <= MIN_CHUNK_TOKENS * 128256 * (4 + 2)
    assert without.breakdown["logits"] < with_logits.breakdown["logits"] / 3
    saved = with_logits.total_bytes - without.total_bytes
    assert saved >= 0.8 * (with_logits.breakdown["logits"] - without.breakdown["logits"]) - 1024 * 4096 * 8


def test_loading_a_bf16_checkpoint_for_fp32_training_peaks_above_the_step_on_cpu():
    """Llama-3.1-8B is stored in bf16: LoRA in fp32 on a CPU converts it, with the mapped file still resident."""
    cpu = Hardware("cpu", 512 * GB)
    converted = estimate_memory(LLAMA_8B, TrainConfig(method="lora", dtype="fp32", seq_len=256), cpu)
    params = arch_info(LLAMA_8B).params
    assert converted.load_peak_bytes >= params * (2 + 4)  # the bf16 file and its fp32 copy
    assert converted.load_peak_bytes > converted.training_bytes
    assert converted.total_bytes == converted.load_peak_bytes
    assert any("loading the checkpoint" in note for note in converted.notes)
    # bf16 LoRA keeps the frozen base in bf16: the weights are the file's own pages, no conversion.
    assert estimate_memory(LLAMA_8B, TrainConfig(method="lora", dtype="bf16", seq_len=256), cpu).load_peak_bytes == 0
    # On a GPU the conversion happens in host memory, not in the device memory the estimate is about.
    on_gpu = estimate_memory(LLAMA_8B, TrainConfig(method="lora", dtype="fp32", seq_len=256), Hardware("cuda", 80 * GB))
    assert on_gpu.load_peak_bytes == 0


def test_no_batch_fits_when_loading_alone_does_not():
    config = TrainConfig(method="lora", dtype="fp32", seq_len=256)
    converted = estimate_memory(LLAMA_8B, config, Hardware("cpu", 512 * GB))
    between = (converted.training_bytes + converted.load_peak_bytes) // 2
    assert max_batch_size(LLAMA_8B, config, Hardware("cpu", between)) == 0
    assert max_batch_size(LLAMA_8B, config, Hardware("cpu", converted.load_peak_bytes + GB)) >= 1


def test_max_batch_size_is_the_largest_that_fits():
    hardware = Hardware("cuda", 40 * GB)
    config = TrainConfig(method="lora", dtype="bf16", seq_len=512, grad_checkpointing=True)
    largest = max_batch_size(LLAMA_8B, config, hardware)
    assert largest > 1
    at = estimate_memory(LLAMA_8B, config.model_copy(update={"batch_size": largest}), hardware)
    over = estimate_memory(LLAMA_8B, config.model_copy(update={"batch_size": largest + 1}), hardware)
    assert at.fits and not over.fits


def test_grad_accum_for_target_batch():
    assert grad_accum_for(64, 4, 1) == 16
    assert grad_accum_for(64, 4, 8) == 2
    assert grad_accum_for(10, 4, 1) == 3


def test_suggestions_when_it_does_not_fit():
    """memfit.estimate.advice.suggestions (tests/test_advice.py has the search itself): the cheapest
    change that fits first, then the single changes that do not fit alone, largest saving first."""
    hardware = Hardware("cuda", 16 * GB)
    config = TrainConfig(method="lora", dtype="bf16", seq_len=3072, grad_checkpointing=False)
    estimate = estimate_memory(LLAMA_8B, config, hardware)
    assert not estimate.fits
    advice = suggestions(LLAMA_8B, config, hardware, estimate.total_bytes)
    # Checkpointing alone is not enough (15 GB of bf16 weights), nor is offloading them alone (21 GB of activations
    # at 3,072 tokens): checkpointing leads, combined with what keeps the math (ZeRO-3 offload of the weights to CPU
    # RAM) before anything that changes the training (QLoRA).
    assert advice[0].fits and advice[0].change.startswith("--grad-checkpointing ")
    fitting = [item for item in advice if item.fits]
    assert [item.cost for item in fitting] == sorted(item.cost for item in fitting)
    assert all(item.saving_bytes > 0 for item in advice)
    rest = [item for item in advice if not item.fits]
    assert "--grad-checkpointing" in [item.change for item in rest]
    assert "--method qlora" in [item.change for item in advice]
    assert [item.saving_bytes for item in rest] == sorted((item.saving_bytes for item in rest), reverse=True)


def test_json_has_the_design_fields():
    estimate = estimate_memory(LLAMA_8B, TrainConfig(method="qlora", seq_len=2048), Hardware("cuda", 24 * GB))
    data = to_json(estimate, 0, 1, [])
    for key in ("params", "trainable_params", "breakdown", "total_bytes", "device_memory_bytes", "fits",
                "max_batch_size", "grad_accum", "notes"):
        assert key in data
    assert set(data["breakdown"]) == {"weights", "adapters", "gradients", "optimizer", "activations", "logits",
                                      "runtime"}
    assert data["total_bytes"] == sum(data["breakdown"].values())


@pytest.mark.parametrize("name", ["gpt2", "gemma-2-2b", "phi-3-mini", "qwen2.5-0.5b", "mistral-7b"])
def test_every_family_estimates(name):
    hf_config = ARCHITECTURES[name].to_hf_config()
    # Full logits, kept for backward (no checkpointing): their term shows.
    config = TrainConfig(method="lora", seq_len=256, chunked_loss=False, grad_checkpointing=False)
    estimate = estimate_memory(hf_config, config, Hardware("cuda", 80 * GB))
    assert estimate.params == ARCHITECTURES[name].param_count
    assert estimate.breakdown["activations"] > 0 and estimate.breakdown["logits"] > 0


def test_estimating_leaves_the_global_rng_alone():
    """A training run estimates itself before its first step: that must not shift its dropout masks."""
    import torch

    config = TrainConfig(method="lora", lora_rank=3, seq_len=96, batch_size=3)  # a config no other test traces
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    estimate_memory(ARCHITECTURES["tiny"].to_hf_config(), config, Hardware("cpu", 8 * GB))
    assert torch.equal(torch.rand(4), expected)


def test_an_allocator_policy_other_than_the_default_is_named_in_the_cpu_estimate(monkeypatch):
    """The estimate models RSS under the default policy; under another one its peak runs higher, and the notes say so."""
    config, cpu = TrainConfig(method="lora", seq_len=256), Hardware("cpu", 512 * GB)
    monkeypatch.delenv("MEMFIT_MALLOC", raising=False)
    assert not any("MEMFIT_MALLOC" in note for note in estimate_memory(LLAMA_8B, config, cpu).notes)
    monkeypatch.setenv("MEMFIT_MALLOC", "trim")
    assert any("MEMFIT_MALLOC=trim" in note for note in estimate_memory(LLAMA_8B, config, cpu).notes)
    assert not any("MEMFIT_MALLOC" in note for note in estimate_memory(LLAMA_8B, config, Hardware("cuda", 80 * GB)).notes)


def test_three_figures_each_named_for_its_counter():
    """CUDA: tensors < allocator blocks < the process (context outside the allocator); the verdict uses the process
    figure, and total_bytes stays its alias. CPU: one counter (RSS), so the three are the same figure."""
    from memfit.estimate.memory import CUDA_CONTEXT_BYTES, to_json

    config = TrainConfig(method="lora", dtype="bf16", seq_len=1024)
    cuda = estimate_memory(LLAMA_8B, config, Hardware("cuda", 24 * GB))
    runtime = cuda.breakdown["runtime"]
    assert cuda.allocated_peak_bytes == cuda.total_bytes - runtime
    assert cuda.reserved_peak_bytes == cuda.allocated_peak_bytes + runtime - CUDA_CONTEXT_BYTES
    assert cuda.allocated_peak_bytes < cuda.reserved_peak_bytes < cuda.process_bytes == cuda.total_bytes
    assert cuda.process_bytes - cuda.reserved_peak_bytes == CUDA_CONTEXT_BYTES
    tight = Hardware("cuda", cuda.reserved_peak_bytes + CUDA_CONTEXT_BYTES // 2)  # reserved fits, the process not
    assert not estimate_memory(LLAMA_8B, config, tight).fits
    cpu = estimate_memory(LLAMA_8B, config, Hardware("cpu", 512 * GB))
    assert cpu.allocated_peak_bytes == cpu.reserved_peak_bytes == cpu.process_bytes == cpu.total_bytes
    fields = to_json(cuda, 1, 1, [])
    assert (fields["allocated_peak_bytes"], fields["reserved_peak_bytes"], fields["process_bytes"]) == (
        cuda.allocated_peak_bytes, cuda.reserved_peak_bytes, cuda.total_bytes)


def test_a_cpu_lora_estimate_says_when_the_heap_serves_its_key_value_tensors():
    # smollm2-135m's keys/values are 192 wide: 2 x 128 tokens of them (192 KiB) come from glibc's heap, whose
    # retention the estimate does not model; 4 x 512 (1.5 MiB) are mmapped and go back when freed.
    hf_config = ARCHITECTURES["smollm2-135m"].to_hf_config()

    def heap_notes(**values) -> list[str]:
        estimate = estimate_memory(hf_config, TrainConfig(**values), Hardware("cpu", 16 * GB))
        return [note for note in estimate.notes if "mmap threshold" in note]

    small = heap_notes(method="lora", dtype="fp32", batch_size=2, seq_len=128)
    assert len(small) == 1 and "(192 KiB)" in small[0]
    assert heap_notes(method="lora", dtype="fp32", batch_size=4, seq_len=512) == []
    assert heap_notes(method="full", dtype="fp32", batch_size=2, seq_len=128) == []  # not measured for full


def test_a_tied_embeddings_two_gradients_are_summed_as_a_real_step_sums_them(tmp_path):
    """Full fp32 training of a tied model whose embedding is much of the step (32,768 x 256: 32 MB): the trace's
    backward peak follows a real step's, measured in a child (the 3rd step's RSS high-water after the gradient
    reaches the last layer, over the RSS where the step began). The autograd engine sums the head's gradient and
    the lookup's in place; fake tensors make that sum out of place, and counted so the trace was 30 MB over
    (105 against 75 MB), with the buffer handed over 12 MB (memfit.estimate.trace._accumulate_in_place). About 15 s."""
    from transformers import AutoConfig

    from memfit.estimate import cuts
    from memfit.estimate.dtypes import resolve_dtypes
    from memfit.estimate.measure import phase_rises_in_child
    from memfit.models import init_model

    model_dir = init_model("tiny", tmp_path / "tied", num_layers=4,
                           overrides=dict(vocab_size=32768, hidden_size=256, intermediate_size=512))
    case = dict(method="full", dtype="fp32", batch_size=4, seq_len=512)
    measured = {row["phase"]: row["over_step_bytes"] for row in phase_rises_in_child(model_dir, case)}
    hf_config = AutoConfig.from_pretrained(model_dir)
    assert hf_config.tie_word_embeddings
    config = TrainConfig(**case)
    traced = cuts.traced_peaks(hf_config, arch_info(hf_config), config, resolve_dtypes("fp32", "cpu"), 4)
    embedding_bytes = 32768 * 256 * 4
    assert abs(traced["backward"].total - measured["backward"]) < embedding_bytes / 2, (
        f"backward: traced {traced['backward'].total / 2**20:.0f} MB, measured {measured['backward'] / 2**20:.0f} MB")
