"""The chunked cross-entropy through the lm_head: the same loss and gradients as full logits, without them."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from memfit.config import TrainConfig
from memfit.runtime import run_python_json
from memfit.train.chunk_size import chunk_tokens, even_chunk_tokens
from memfit.train.chunked_loss import (chunked_loss_blocker, head_returns_hidden, linear_cross_entropy,
                                       linear_token_losses)
from memfit.train.losses import IGNORE_INDEX, micro_step_loss, scored_tokens


def _reference(hidden, weight, bias, targets, weights):
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    return (F.cross_entropy(logits.double(), targets, reduction="none") * weights).sum()


def _problem(tokens=13, hidden_size=6, vocab=11, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=generator, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(hidden_size, vocab, bias=bias).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden_size, generator=generator))
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    weights = torch.rand(tokens, generator=generator, dtype=torch.float64)
    return hidden, head, targets, weights


@pytest.mark.parametrize("chunk", [1, 4, 13, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_loss_and_every_gradient_match_full_logits(chunk, bias):
    hidden, head, targets, weights = _problem(bias=bias)
    loss = linear_cross_entropy(hidden, head, targets, weights, chunk=chunk)
    (2.5 * loss).backward()  # a scaled loss: backward must use the incoming gradient, not assume 1
    got = [hidden.grad, head.weight.grad] + ([head.bias.grad] if bias else [])
    hidden.grad, head.weight.grad = None, None
    if bias:
        head.bias.grad = None
    expected_loss = _reference(hidden, head.weight, head.bias, targets, weights)
    (2.5 * expected_loss).backward()
    expected = [hidden.grad, head.weight.grad] + ([head.bias.grad] if bias else [])
    assert float(loss.detach()) == pytest.approx(float(expected_loss.detach()), rel=1e-6)
    for mine, theirs in zip(got, expected):
        torch.testing.assert_close(mine, theirs.to(mine.dtype), rtol=1e-5, atol=1e-6)


def test_frozen_head_gets_no_gradient_and_no_weight_sized_buffer():
    hidden, head, targets, weights = _problem()
    head.requires_grad_(False)
    linear_cross_entropy(hidden, head, targets, weights, chunk=5).backward()
    assert head.weight.grad is None and hidden.grad is not None


def test_no_grad_path_gives_the_same_loss_and_per_token_losses():
    hidden, head, targets, weights = _problem()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, head, targets, weights, chunk=3)
        per_token = linear_token_losses(hidden, head, targets, chunk=4)
    logits = hidden.detach() @ head.weight.T + head.bias
    torch.testing.assert_close(per_token, F.cross_entropy(logits, targets, reduction="none").float(),
                               rtol=1e-5, atol=1e-6)
    assert float(loss) == pytest.approx(float(_reference(hidden, head.weight, head.bias, targets, weights)), rel=1e-6)


def test_chunk_rule_keeps_one_chunk_of_logits_about_the_size_of_the_hidden_states():
    tokens, vocab, hidden_size = 8 * 2048, 128_256, 4096
    chunk = chunk_tokens(tokens, vocab, hidden_size)
    assert chunk & (chunk - 1) == 0  # a power of two
    assert tokens * hidden_size / 2 <= chunk * vocab <= 2 * tokens * hidden_size
    assert chunk_tokens(1, vocab, hidden_size) == 1
    # Small models: a floor, or the many tiny matmuls cost more than full logits.
    assert chunk_tokens(1100, 49_152, 576) == 256 and chunk_tokens(100, 49_152, 576) == 100
    # torch's loss spreads the tokens evenly over as many chunks: no chunk larger than it must be.
    assert even_chunk_tokens(345, 151_936, 896) == 173 and even_chunk_tokens(512, 151_936, 896) == 256
    assert even_chunk_tokens(1100, 49_152, 576) == 220 and even_chunk_tokens(100, 49_152, 576) == 100
    assert even_chunk_tokens(0, 49_152, 576) == chunk_tokens(0, 49_152, 576)


def _tiny_causal_lm(model_type="llama", **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=97, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=64, tie_word_embeddings=True, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()


def test_head_bypass_returns_hidden_states_and_restores_the_head():
    model = _tiny_causal_lm()
    input_ids = torch.randint(0, 97, (2, 7))
    keys = set(model.state_dict())
    with head_returns_hidden(model) as head:
        hidden = model(input_ids=input_ids).logits
        assert head is model.lm_head and hidden.shape == (2, 7, 32)
        assert set(model.state_dict()) == keys  # nothing renamed or removed: checkpoints are unaffected
    torch.testing.assert_close(model(input_ids=input_ids).logits, model.lm_head(hidden))
    assert "forward" not in vars(model.lm_head)


def test_models_with_logit_transforms_keep_full_logits():
    assert chunked_loss_blocker(_tiny_causal_lm()) is None
    softcapped = _tiny_causal_lm("gemma2", final_logit_softcapping=30.0, head_dim=8)
    assert "final_logit_softcapping" in chunked_loss_blocker(softcapped)


def test_a_training_micro_step_matches_full_logits_on_a_lora_model():
    """The loop's loss path on a real (tiny) LoRA model: same loss, same adapter gradients, prompt tokens masked."""
    from memfit.precision import resolve_precision
    from memfit.train.model import apply_lora

    config = TrainConfig(method="lora", lora_rank=4)
    labels = torch.randint(0, 97, (3, 9))
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[2, 6:] = IGNORE_INDEX  # padding
    scored = scored_tokens(labels, torch.rand(3, 9))
    input_ids = labels.clamp(min=0)
    results = []
    for chunked in (False, True):
        model = apply_lora(_tiny_causal_lm(), config, resolve_precision("fp32", "cpu"))
        torch.manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param)  # B starts at zero: make the adapters matter
        if chunked:
            with head_returns_hidden(model) as head:
                loss = micro_step_loss(model, {"input_ids": input_ids}, scored, head=head,
                                       compute_dtype=torch.float32)
        else:
            loss = micro_step_loss(model, {"input_ids": input_ids}, scored, head=None, compute_dtype=torch.float32)
        loss.backward()
        results.append((float(loss), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (full_loss, full_grads), (chunked_loss, chunked_grads) = results
    assert chunked_loss == pytest.approx(full_loss, rel=1e-5)
    assert full_grads.keys() == chunked_grads.keys() and full_grads
    for name in full_grads:
        torch.testing.assert_close(chunked_grads[name], full_grads[name], rtol=1e-4, atol=1e-6)


_HIGH_WATER_CHILD = """
import json
import torch
from memfit.allocator import fix_mmap_threshold
from memfit.estimate.measure import _reset_peak_rss
from memfit.guard.sampler import peak_rss_bytes, rss_bytes
from memfit.train.chunked_loss import linear_cross_entropy

fix_mmap_threshold()  # as training does: a freed chunk's logits go back to the OS, so VmHWM sees each call's own rise
tokens, vocab = 256, 49152
hidden = torch.randn(tokens, 64, requires_grad=True)
head = torch.nn.Linear(64, vocab, bias=False).requires_grad_(False)
targets = torch.randint(0, vocab, (tokens,))
weights = torch.ones(tokens)
linear_cross_entropy(hidden, head, targets, weights, chunk=tokens).backward()  # warm-up: kernels, caches
assert _reset_peak_rss()  # restart VmHWM from the current RSS
before = rss_bytes()
linear_cross_entropy(hidden, head, targets, weights, chunk=tokens).backward()
print(json.dumps({"rise": peak_rss_bytes() - before, "chunk_logits": tokens * vocab * 4}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's VmHWM reset")
def test_a_chunk_costs_its_logits_once_no_hidden_buffer_of_the_same_size():
    # torch.logsumexp would add a temporary the size of the chunk's logits (96 MB here instead of 48 MB) inside one
    # op, where the estimator's trace cannot see it; the loss works in the logits' own buffer instead.
    result = run_python_json(["-c", _HIGH_WATER_CHILD], timeout_s=120)
    assert result["rise"] < 1.4 * result["chunk_logits"], result
