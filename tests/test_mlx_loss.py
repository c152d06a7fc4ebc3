"""The MLX engine's chunked loss (memfit.mlx.loss): the same loss and gradients as the full logits, and a lower peak."""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402

from memfit.mlx.loss import make_loss, supports_chunked_loss, weighted_ce  # noqa: E402
from memfit.train.chunk_size import MLX_MIN_CHUNKS, mlx_chunks  # noqa: E402


def _lora_model(model_dir):
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(str(model_dir))
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": 4, "scale": 2.0, "dropout": 0.0})
    mx.random.seed(0)
    # LoRA's B starts at zero, which makes A's gradient zero: small random values make every gradient informative.
    model.update(tree_map(lambda a: mx.random.normal(a.shape) * 0.02, model.trainable_parameters()))
    mx.eval(model.parameters())
    return model


def _batch(vocab: int, rows: int, width: int):
    rng = np.random.default_rng(0)
    weights = (rng.random((rows, width)) > 0.2).astype(np.float32)
    return (mx.array(rng.integers(0, vocab, (rows, width)).astype(np.int32)),
            mx.array(rng.integers(0, vocab, (rows, width)).astype(np.int32)), mx.array(weights))


def _step_peaks(model, rows: int, width: int) -> tuple[dict[bool, int], int]:
    """MLX's peak over one value_and_grad step with the full logits (False) and chunked (True), and the bytes of
    the full fp32 logits."""
    inputs, targets, weights = _batch(model.args.vocab_size, rows, width)
    peaks = {}
    for chunked in (False, True):
        step = nn.value_and_grad(model, make_loss(model, chunked))
        mx.clear_cache()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(*step(model, inputs, targets, weights))
        peaks[chunked] = mx.get_peak_memory() - before
    return peaks, rows * width * model.args.vocab_size * 4


@pytest.mark.parametrize("head_trains", [False, True], ids=["frozen-head-fused", "trained-head-checkpointed"])
def test_chunked_loss_equals_the_full_logits_loss(tiny_model_dir, head_trains):
    """Both forms of a chunk: a frozen head's chunks compute their hidden-state gradient in the forward pass, a
    trained head's run under a checkpoint (and give the head's weight its gradient)."""
    model = _lora_model(tiny_model_dir)
    if head_trains:
        model.unfreeze()  # full training: the (tied) embedding that is the head trains too
    assert supports_chunked_loss(model)
    rows, width = 4, 256
    assert mlx_chunks(rows * width, model.args.vocab_size, model.args.hidden_size)  # the trainer chunks
    inputs, targets, weights = _batch(model.args.vocab_size, rows, width)
    results = {}
    for chunked in (False, True):
        loss, grads = nn.value_and_grad(model, make_loss(model, chunked))(model, inputs, targets, weights)
        mx.eval(loss, grads)
        results[chunked] = (float(loss), dict(tree_flatten(grads)))
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    assert results[True][1].keys() == results[False][1].keys()
    assert any("embed_tokens" in name or "lm_head" in name for name in results[True][1]) == head_trains
    for name, full in results[False][1].items():
        assert float(mx.abs(full).max()) > 0, name
        difference = float(mx.abs(results[True][1][name] - full).max())  # the trained embedding: 6.7e-6 of 20.7
        assert mx.allclose(results[True][1][name], full, rtol=1e-4, atol=1e-5), (name, difference)


def test_chunked_loss_lowers_the_peak_by_the_logits(tiny_model_dir):
    """The full logits (4 x 256 tokens x the vocab, fp32) live through the backward pass; the chunked loss holds a
    few 64-token chunks' at a time. The tiny model keeps it fast (MLX's CPU matmuls are slow); the saving scales with
    the vocab (benchmarks/mlx_vs_mlx_lm.py measures it on smollm2-135m)."""
    model = _lora_model(tiny_model_dir)
    rows, width = 4, 256
    peaks, logits_bytes = _step_peaks(model, rows, width)
    assert peaks[False] - peaks[True] > logits_bytes / 2, {k: v / 2**20 for k, v in peaks.items()}


def test_the_full_loss_is_the_fallback(tiny_model_dir):
    model = _lora_model(tiny_model_dir)
    assert make_loss(model, chunked=False) is weighted_ce
    model.model_type = "gemma3_text"  # a head with scaled, soft-capped logits: not a plain projection
    assert not supports_chunked_loss(model)
    assert make_loss(model, chunked=True) is weighted_ce


def test_fewer_chunks_than_mlx_min_chunks_take_the_full_logits(tiny_model_dir):
    """1 x 128 tokens, four chunks of 32, fewer than MLX_MIN_CHUNKS: the chunked loss is the full-logits loss (mlx-lm's
    arrays; a checkpointed single chunk held more, a fused one let MLX run further ahead: memfit.mlx.loss), so the
    step holds what the full-logits step holds, and the loss and gradients are the same."""
    model = _lora_model(tiny_model_dir)
    width = 128
    assert MLX_MIN_CHUNKS > 4 and not mlx_chunks(width, model.args.vocab_size, model.args.hidden_size)
    inputs, targets, weights = _batch(model.args.vocab_size, 1, width)
    peaks, results = {}, {}
    for chunked in (False, True):
        step = nn.value_and_grad(model, make_loss(model, chunked))
        mx.eval(*step(model, inputs, targets, weights))  # warm-up: the same allocations both times
        mx.clear_cache()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        loss, grads = step(model, inputs, targets, weights)
        mx.eval(loss, grads)
        peaks[chunked] = mx.get_peak_memory() - before
        results[chunked] = (float(loss), dict(tree_flatten(grads)))
    # A checkpointed single chunk held a quarter of the logits more (256 KB at 256 tokens, 2026-12-03); the plain
    # head's own reshapes move the peak by 2-70 KB from run to run.
    logits_bytes = 256 * model.args.vocab_size * 4
    assert abs(peaks[True] - peaks[False]) < logits_bytes / 8, {k: v / 2**20 for k, v in peaks.items()}
    assert results[True][0] == results[False][0]
    for name, full in results[False][1].items():
        assert mx.array_equal(results[True][1][name], full), name


def test_a_rows_last_token_is_fed_only_as_a_target(tiny_model_dir):
    """memfit.mlx.batches: the position after a row's last token is never scored, so the micro-batch leaves it out
    (as mlx-lm does; full rows of seq_len tokens then take seq_len - 1 positions, no padding) and the loss is the
    one of every token fed."""
    from pathlib import Path

    from transformers import AutoTokenizer

    import memfit.data
    from memfit.data import build_dataset, collate, pad_token_id
    from memfit.mlx.batches import micro_batch
    from memfit.train.losses import IGNORE_INDEX, scored_tokens

    model = _lora_model(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    dataset = build_dataset(Path(memfit.data.__file__).parent / "demo.jsonl", tokenizer, 64, packing=False)
    rows, pad = dataset.rows[:4], pad_token_id(tokenizer)
    assert max(len(row.input_ids) for row in rows) == 64
    batch = micro_batch(rows, dataset.samples, pad, max_width=63)
    assert batch.inputs.shape == batch.targets.shape == batch.weights.shape == (4, 63)

    full = collate(rows, dataset.samples, pad)  # every token fed, the torch engine's layout
    weights = (full.labels != IGNORE_INDEX).float()
    weights[:, 0] = 0.0
    scored = scored_tokens(full.labels, weights)
    targets = np.where(scored.targets.view(4, 64).numpy() == IGNORE_INDEX, 0, scored.targets.view(4, 64).numpy())
    reference = weighted_ce(model, mx.array(full.input_ids.numpy().astype(np.int32)),
                            mx.array(targets.astype(np.int32)), mx.array(scored.weights.view(4, 64).numpy()))
    trimmed = weighted_ce(model, batch.inputs, batch.targets, batch.weights)
    assert float(mx.sum(batch.weights)) == float(scored.weights.sum()) > 0
    assert float(trimmed) == pytest.approx(float(reference), rel=1e-5)


@pytest.fixture(scope="module")
def head_heavy_model_dir(tmp_path_factory):
    """A llama whose head dominates the step (benchmarks/derive_mlx_constants.py's shape f: 32k vocab, width 64)."""
    from memfit.models import init_model

    path = tmp_path_factory.mktemp("head-heavy")
    init_model("tiny", path, num_layers=1, overrides=dict(hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                                          num_key_value_heads=1, vocab_size=32768))
    return path


def test_chunks_run_one_after_another(head_heavy_model_dir):
    """The fused chunks are ordered (mx.depends): each chunk's logits are gone before the next chunk's begin. Without
    the order MLX started several chunks' logits at once, and the chunked step held about as much as the full logits
    (489 against 525 MB here, the full logits being 128 MB); with it, 329 MB."""
    model = _lora_model(head_heavy_model_dir)
    rows, width = 2, 512
    peaks, logits_bytes = _step_peaks(model, rows, width)
    assert peaks[False] - peaks[True] > logits_bytes, {k: v / 2**20 for k, v in peaks.items()}
