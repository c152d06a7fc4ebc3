"""Packed rows without cross-sample attention: collate's position_ids, and the architectures that honour them.

Each check builds a tiny 2-layer fp32 model in-process and compares the logits of a collated packed batch
(position_ids, attention_mask=None, no cache) with those of every sample run alone.
"""

from __future__ import annotations

import pytest
import torch

from memfit.data import Record, Row, collate
from memfit.models.attention import (ISOLATING_TYPES, SEGMENTED, packing_isolated, runs_by_segment,
                                     segment_bounds, use_segmented_attention)
from memfit.models.registry import ARCHITECTURES
from memfit.train.losses import IGNORE_INDEX
from memfit.train.validation import model_inputs

transformers = pytest.importorskip("transformers")


VOCAB = 97
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
WINDOW = 3  # shorter than the segments, so sliding layers cut inside them
# Per type: what a tiny working config needs beyond TINY (expert counts), and a short sliding window where it has one.
EXTRA = {
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": dict(sliding_window=WINDOW, use_sliding_window=True, max_window_layers=1),  # layer 0 full, 1 sliding
    "phi3": dict(sliding_window=WINDOW),
    "gemma2": dict(sliding_window=WINDOW, query_pre_attn_scalar=8),  # alternates sliding and full layers
    "gemma3_text": dict(sliding_window=WINDOW, query_pre_attn_scalar=8),
    "starcoder2": dict(sliding_window=WINDOW),
    "gpt_neox": dict(rotary_pct=0.5),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=16),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
}
# The presets' types keep their preset's own extras (rope scaling, soft-capping, ...) under the tiny shapes.
PRESETS = {arch.model_type: arch for arch in reversed(list(ARCHITECTURES.values()))}  # the first of each type


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models: handing each small op to a second thread costs more than the math, and far more on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(model_type: str):
    if model_type == "gpt2":
        kw = dict(ARCHITECTURES["gpt2"].hf_config_kwargs(2), vocab_size=VOCAB, n_embd=32, n_head=4, n_inner=64,
                  bos_token_id=1, eos_token_id=2)
    else:
        kw = dict(PRESETS[model_type].hf_config_kwargs(2)) if model_type in PRESETS else {}
        kw.update(TINY, **EXTRA.get(model_type, {}))
    return transformers.AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str, attn: str):
    torch.manual_seed(0)
    try:
        model = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type), attn_implementation=attn)
    except ValueError as error:
        if attn == "eager" or "does not support an attention implementation" not in str(error):
            raise
        pytest.skip(f"{model_type} has no {attn} in this transformers (gemma2 in 5.x): nothing to check")
    return model.float().eval()


def packed_rows() -> tuple[list[Row], list[list[int]]]:
    """Rows as `build_dataset` lays them out, and each sample's tokens: a packed row, a padded single sample, and a
    packed row that starts with a 1-token sample."""
    generator = torch.Generator().manual_seed(1)
    samples = [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in (7, 5, 4, 1, 6)]
    rows = []
    for indices in ([0, 1], [2], [3, 4]):
        ids, labels, segments = [], [], []
        for index in indices:
            segments.append((len(ids), len(ids) + len(samples[index]), index))
            labels += [IGNORE_INDEX if ids else samples[index][0]] + samples[index][1:]
            ids += samples[index]
        rows.append(Row(ids, labels, segments))
    return rows, samples


def collated():
    rows, samples = packed_rows()
    return rows, samples, collate(rows, [Record(i + 1, "text", text="x") for i in range(len(samples))], pad_id=0)


def max_gap(model, rows, samples, logits) -> float:
    """Largest |packed - alone| logit difference over every segment of every row."""
    gap = 0.0
    with torch.no_grad():
        for b, row in enumerate(rows):
            for start, end, index in row.segments:
                alone = model(input_ids=torch.tensor([samples[index]]), use_cache=False).logits[0]
                gap = max(gap, (logits[b, start:end] - alone).abs().max().item())
    return gap


# --- collate ----------------------------------------------------------------------------------------------------


def test_collate_position_ids_restart_per_segment_and_padding():
    rows, _, batch = collated()
    assert batch.position_ids.dtype == torch.long and batch.position_ids.shape == batch.input_ids.shape == (3, 12)
    assert batch.position_ids.tolist() == [
        [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4],
        [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7],  # the padding tail is a sequence of its own
        [0, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4],  # a 1-token sample: two zeros in a row still mark a new sequence
    ]
    assert batch.packed is True
    moved = batch.to("cpu")
    assert moved.packed is True and moved.position_ids.equal(batch.position_ids)

    single = collate([rows[1]], [Record(i + 1, "text", text="x") for i in range(5)], pad_id=0)
    assert single.packed is False and single.position_ids.tolist() == [[0, 1, 2, 3]]
    assert single.to("cpu").packed is False


def test_the_padding_needs_no_mask():
    # Right padding under causal attention: real tokens only see earlier positions, so without a mask their logits
    # are those of the sample alone; the pads' own logits are garbage that the IGNORE labels never score.
    rows, samples, batch = collated()
    assert batch.labels[batch.attention_mask == 0].eq(IGNORE_INDEX).all()
    model = tiny_model("llama", "sdpa")
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids[1:2], position_ids=batch.position_ids[1:2], use_cache=False).logits
    assert max_gap(model, rows[1:2], samples, logits) < 1e-4


# --- isolation per architecture ---------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type", sorted(ISOLATING_TYPES))
def test_packed_logits_equal_separate_logits(model_type, attn):
    model = tiny_model(model_type, attn)
    assert packing_isolated(model)
    rows, samples, batch = collated()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=None,
                       use_cache=False).logits
        leaky = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    assert max_gap(model, rows, samples, logits) < 1e-4
    assert max_gap(model, rows, samples, leaky) > 1e-3  # the check can tell: with the mask, samples see each other


def test_every_listed_type_has_a_tiny_config():
    # A type joins ISOLATING_TYPES only with a config the check above can build.
    for model_type in ISOLATING_TYPES:
        assert tiny_config(model_type).model_type == model_type
    assert {arch.model_type for arch in ARCHITECTURES.values()} <= ISOLATING_TYPES


@pytest.mark.parametrize(
    ("how", "kwargs"),
    [
        ("attention mask, no positions (packing before position_ids)", dict(mask=True, positions=False)),
        ("attention mask and positions: a 2D mask turns the detection off", dict(mask=True, positions=True)),
        ("positions with a KV cache: the detection needs use_cache=False", dict(mask=False, positions=True,
                                                                             use_cache=True)),
    ],
)
def test_packed_samples_leak_without_isolation(how, kwargs):
    rows, samples, batch = collated()
    model = tiny_model("llama", "sdpa")
    with torch.no_grad():
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask if kwargs["mask"] else None,
            position_ids=batch.position_ids if kwargs["positions"] else None,
            use_cache=kwargs.get("use_cache", False),
        ).logits
    # Sample 1 (second in row 0) sees sample 0: its logits are not those it has alone.
    start, end, index = rows[0].segments[1]
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([samples[index]]), use_cache=False).logits[0]
    assert (logits[0, start:end] - alone).abs().max().item() > 1e-2, how


def test_packing_isolated_falls_back():
    config = tiny_config("llama")
    assert packing_isolated(config)  # attention implementation not chosen yet: transformers picks sdpa or eager
    config._attn_implementation = "flash_attention_2"
    assert not packing_isolated(config)
    falcon = transformers.AutoConfig.for_model("falcon", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=4)
    assert not packing_isolated(falcon)
    assert not packing_isolated(object())


def test_lora_wrapper_keeps_isolation():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_model("llama", "sdpa"),
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    ).eval()
    assert packing_isolated(model)
    rows, samples, batch = collated()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=None,
                       use_cache=False).logits
    assert max_gap(model, rows, samples, logits) < 1e-4


# --- attention by segment ---------------------------------------------------------------------------------------


def segmented(model_type: str):
    model = tiny_model(model_type, "sdpa")
    return model, use_segmented_attention(model)


def test_segment_bounds_follow_the_position_restarts():
    _, _, batch = collated()
    # Rows of 12: [7 | 5], [4 | pad 8], [1 | 6 | 5]; every row start is a bound, and the end.
    assert segment_bounds(batch.position_ids).tolist() == [0, 7, 12, 16, 24, 25, 31, 36]
    assert segment_bounds(torch.arange(5).repeat(2, 1)).tolist() == [0, 5, 10]


@pytest.mark.parametrize("model_type", sorted(ISOLATING_TYPES))
def test_by_segment_logits_equal_separate_logits(model_type):
    model, switched = segmented(model_type)
    if not switched:
        pytest.skip(f"{model_type} runs no sdpa here: nothing to switch")
    assert model.config._attn_implementation == SEGMENTED and packing_isolated(model) and runs_by_segment(model)
    rows, samples, batch = collated()
    with torch.no_grad():
        logits = model(**model_inputs(batch, "cpu", by_segment=True)).logits
        unbounded = model(**model_inputs(batch, "cpu", by_segment=False)).logits  # sdpa with transformers' mask
    assert max_gap(model, rows, samples, logits) < 1e-4
    assert max_gap(model, rows, samples, unbounded) < 1e-4


def test_by_segment_runs_each_segment_alone(monkeypatch):
    # The call count proves the path taken: one SDPA per segment and layer (7 segments in 3 rows, 2 layers), where
    # transformers' sdpa makes one per layer.
    model, _ = segmented("llama")
    _, _, batch = collated()
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: calls.append(kwargs.get("is_causal")) or sdpa(*args, **kwargs))
    with torch.no_grad():
        model(**model_inputs(batch, "cpu", by_segment=True))
        assert calls == [True] * 7 * 2
        calls.clear()
        model(**model_inputs(batch, "cpu", by_segment=False))
    assert calls == [False] * 2  # the block mask, no segments


def test_by_segment_gradients_equal_the_masked_ones():
    # Training: loss and every gradient by segment match transformers' masked sdpa on the same packed batch (GQA
    # heads, LoRA on the attention projections).
    peft = pytest.importorskip("peft")
    _, _, batch = collated()
    grads = {}
    for by_segment in (False, True):
        model = peft.get_peft_model(tiny_model("llama", "sdpa").train(), peft.LoraConfig(
            r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False))
        if by_segment:
            assert use_segmented_attention(model)
        logits = model(**model_inputs(batch, "cpu", by_segment=by_segment)).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(),
                                                 ignore_index=IGNORE_INDEX)
        loss.backward()
        grads[by_segment] = (loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[True][0] == pytest.approx(grads[False][0], abs=1e-6)
    assert grads[True][1].keys() == grads[False][1].keys() and len(grads[True][1]) == 16
    for name, grad in grads[True][1].items():
        torch.testing.assert_close(grad, grads[False][1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_by_segment_is_not_used_where_it_does_not_apply():
    assert not use_segmented_attention(tiny_model("llama", "eager"))  # eager stays eager
    falcon = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(
        "falcon", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
        attn_implementation="sdpa")
    assert not use_segmented_attention(falcon) and not runs_by_segment(falcon)  # a type not checked for isolation
    assert not runs_by_segment(object())


def test_by_segment_rows_of_one_segment_take_one_call(monkeypatch):
    model, _ = segmented("llama")
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(6).repeat(2, 1)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: calls.append(args[0].shape[0]) or sdpa(*args, **kwargs))
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=positions, cu_seq_lens_q=segment_bounds(positions),
                       use_cache=False).logits
        assert calls == [2, 2]  # per layer, the whole batch at once
        plain = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=1e-5)
