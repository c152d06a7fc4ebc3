"""Mixture of experts: what the estimator counts and what `memfit train` does with transformers 5's fused experts.

Tiny cuts of Mixtral and Qwen3-MoE (2 layers, 128 hidden, 4 and 8 experts) train for real on CPU; the full-size
built-ins are counted on the meta device.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memfit.config import TrainConfig
from memfit.models.arch import arch_info
from memfit.estimate.memory import Hardware, estimate_memory, to_json
from memfit.models.registry import get_architecture

DATA = Path(__file__).resolve().parents[1] / "src" / "memfit" / "data" / "demo.jsonl"
TINY = dict(vocab_size=2048, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048, tie_word_embeddings=False)
CUTS = {
    "mixtral-8x7b": dict(TINY, intermediate_size=256, num_local_experts=4),
    "qwen3-30b-a3b": dict(TINY, intermediate_size=256, moe_intermediate_size=96, num_experts=8, head_dim=32),
}


@pytest.fixture(scope="module", params=list(CUTS))
def moe_dir(request, tmp_path_factory) -> Path:
    from memfit.models import init_model

    return init_model(request.param, tmp_path_factory.mktemp("moe") / request.param, num_layers=2,
                      overrides=CUTS[request.param])


def _hf_config(model_dir: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


@pytest.mark.parametrize("name, published_active", [("mixtral-8x7b", 12.9e9), ("qwen3-30b-a3b", 3.3e9)])
def test_active_params_are_the_published_figure(name, published_active):
    # Mixtral: "12.9B active parameters" (Mistral AI's announcement); Qwen3-30B-A3B: "3.3B activated" (model card).
    info = arch_info(get_architecture(name).to_hf_config())
    assert info.experts_per_token in (2, 8) and info.num_experts in (8, 128)
    # Published to 0.1B (Qwen's card truncates 3.35 to 3.3): within that last digit.
    assert abs(info.active_params - published_active) < 0.06e9
    assert info.expert_params > 0.9 * info.params


def test_qlora_counts_the_experts_in_4_bit():
    hf_config = get_architecture("mixtral-8x7b").to_hf_config()
    cuda = Hardware("cuda", 80 * 1024**3)
    qlora = estimate_memory(hf_config, TrainConfig(method="qlora", dtype="bf16"), cuda)
    lora = estimate_memory(hf_config, TrainConfig(method="lora", dtype="bf16"), cuda)
    # 46.7B weights: 93 GB in bf16; nf4 with its absmax is 0.53 bytes a weight, the rest (embeddings, norms,
    # routers: 0.27B) bf16 (fp32 with --qlora-upcast: 0.5 GB more).
    assert lora.breakdown["weights"] == 46_702_792_704 * 2
    assert 22e9 < qlora.breakdown["weights"] < 26e9
    assert qlora.training_bytes < 40e9
    # The experts arrive in bf16 before memfit quantizes them: loading holds them all on the device (a note says so).
    assert qlora.load_peak_bytes > 90e9 and qlora.total_bytes == qlora.load_peak_bytes
    assert any("before memfit quantizes them" in note for note in qlora.notes)
    data = to_json(qlora, 0, 1, [])
    assert data["num_experts"] == 8 and data["experts_per_token"] == 2
    assert data["active_params"] == arch_info(hf_config).active_params < data["params"]


def test_dense_models_report_no_experts():
    data = to_json(estimate_memory(get_architecture("tiny").to_hf_config(), TrainConfig(method="lora"),
                                   Hardware("cpu", 1 << 40)), 0, 1, [])
    assert data["num_experts"] is None and data["active_params"] == data["params"]


@pytest.mark.parametrize("targets", ["all-linear", "q_proj,experts", "experts"])
def test_trainable_params_match_peft(moe_dir, targets):
    """The estimate's adapter count is what PEFT really adds, experts (target_parameters) included."""
    from memfit.precision import resolve_precision
    from memfit.train.model import load_model

    config = TrainConfig(method="lora", dtype="fp32", lora_targets=targets, lora_rank=8)
    model = load_model(moe_dir, config, resolve_precision("fp32", "cpu"))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    estimate = estimate_memory(_hf_config(moe_dir), config, Hardware("cpu", 1 << 40))
    assert estimate.trainable_params == trained
    on_experts = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".experts." in n)
    assert (on_experts > 0) == ("experts" in targets)


def test_qlora_quantizes_the_experts_and_keeps_them_out_of_fp32(moe_dir):
    import torch

    from memfit.precision import resolve_precision
    from memfit.train.model import load_model

    lines = []
    model = load_model(moe_dir, TrainConfig(method="qlora", dtype="fp32"), resolve_precision("fp32", "cpu"),
                       notify=lines.append)
    experts = [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
    assert len(experts) == 2
    for module in experts:
        stored = {name: plist.original for name, plist in module.parametrizations.items()}
        assert set(stored) == {"gate_up_proj", "down_proj"}
        assert all(t.dtype == torch.uint8 and not t.requires_grad for t in stored.values())
    assert len(lines) == 1 and "quantized to nf4" in lines[0]
    # One forward and backward: the LoRA adapters get gradients through the dequantized experts.
    ids = torch.randint(0, 2000, (2, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("quant", ["4", "8"])
@pytest.mark.parametrize("upcast", [False, True], ids=["default", "upcast"])
def test_kbit_layouts_leave_the_experts_as_they_were(moe_dir, quant, upcast):
    """Both layouts (memfit.train.model.prepare_kbit): the experts stay nf4 (4-bit) or bf16 (8-bit), frozen, never
    fp32; the other unquantized weights (embeddings, norms, routers' neighbours) follow --qlora-upcast."""
    import torch

    from memfit.precision import resolve_precision
    from memfit.train.model import load_model

    config = TrainConfig(method="qlora", quant=quant, dtype="bf16", qlora_upcast=upcast)
    model = load_model(moe_dir, config, resolve_precision("bf16", "cpu"))
    experts = [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
    for module in experts:
        if quant == "4":
            stored = [plist.original for plist in module.parametrizations.values()]
            assert len(stored) == 2 and all(t.dtype == torch.uint8 for t in stored)
        else:
            stored = [module.gate_up_proj, module.down_proj]
            assert all(t.dtype == torch.bfloat16 for t in stored)
        assert not any(t.requires_grad for t in stored)
    others = {p.dtype for n, p in model.named_parameters()
              if not p.requires_grad and p.dtype.is_floating_point and ".experts." not in n}
    assert others == {torch.float32 if upcast else torch.bfloat16}


def _train(model_dir: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MEMFIT_NO_COLOR="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "memfit", "train", "--model", str(model_dir), "--data", str(DATA),
                           "--max-steps", "3", "--seq-len", "128", "--batch-size", "2", "--output-dir", str(out),
                           *flags], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("method, flags, line", [
    ("qlora", (), "quantized to nf4"),
    ("lora", ("--lora-targets", "q_proj,v_proj,experts"), "LoRA rank 16 on every expert"),
])
def test_train_tiny_moe_under_the_guard(moe_dir, tmp_path, method, flags, line):
    """Slow (~15 s each): a real `memfit train` run in a child, guard on (the default)."""
    result = _train(moe_dir, tmp_path / "run", "--method", method, *flags)
    assert result.returncode == 0, result.stderr[-2000:]
    assert line in result.stdout + result.stderr
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "done"
    assert (tmp_path / "run" / "checkpoints" / "step-3").is_dir()


def test_lora_on_4bit_experts_is_refused_in_one_line(moe_dir, tmp_path):
    result = _train(moe_dir, tmp_path / "run", "--method", "qlora", "--lora-targets", "experts")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "PEFT cannot put LoRA on 4-bit expert weights" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
