"""A k-bit base's unquantized weights (embeddings, norms, lm_head): in the compute dtype by default, in fp32 with
--qlora-upcast (PEFT's prepare_model_for_kbit_training); the estimator follows both; old checkpoints resume as they
trained. The losses of both layouts, and the memory saved, are measured by benchmarks/qlora_layout.py."""

import pytest
import torch

from memfit.config import TrainConfig, saved_config_values
from memfit.models.arch import arch_info
from memfit.estimate.memory import Hardware, estimate_memory
from memfit.models.registry import get_architecture
from memfit.train.checkpoint import resume_conflicts

GB = 1024**3


def _layout(model) -> dict[str, dict[str, torch.dtype]]:
    """Parameters by role: quantized (bitsandbytes' integer storage), unquantized frozen, trained."""
    roles: dict[str, dict[str, torch.dtype]] = {"quantized": {}, "unquantized": {}, "trained": {}}
    for name, param in model.named_parameters():
        role = ("trained" if param.requires_grad else "unquantized" if param.dtype.is_floating_point
                else "quantized")
        roles[role][name] = param.dtype
    return roles


@pytest.mark.parametrize("quant", ["4", "8"])
@pytest.mark.parametrize("upcast", [False, True], ids=["default", "upcast"])
def test_unquantized_weights_stay_in_the_compute_dtype_unless_upcast(tiny_model_dir, quant, upcast):
    from memfit.precision import resolve_precision
    from memfit.train.model import load_model

    config = TrainConfig(method="qlora", quant=quant, dtype="bf16", qlora_upcast=upcast, seq_len=32)
    model = load_model(tiny_model_dir, config, resolve_precision("bf16", "cpu"))
    roles = _layout(model)
    unquantized = roles["unquantized"]
    assert any("embed_tokens" in name for name in unquantized) and any(name.endswith("norm.weight")
                                                                       for name in unquantized)
    assert set(unquantized.values()) == {torch.float32 if upcast else torch.bfloat16}
    # LoRA adapters fp32 (PEFT's default under mixed precision), the base linear layers quantized.
    assert roles["trained"] and all("lora_" in name for name in roles["trained"])
    assert set(roles["trained"].values()) == {torch.float32}
    assert set(roles["quantized"].values()) == {torch.uint8 if quant == "4" else torch.int8}
    assert len(roles["quantized"]) == 7 * model.config.num_hidden_layers  # q k v o gate up down
    # What PEFT's preparation does besides the cast, done in both layouts: the base frozen, checkpointing on with
    # the embeddings' output requiring grad (so the adapters get gradients through checkpointed layers).
    assert any(getattr(module, "gradient_checkpointing", False) for module in model.modules())
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_fp32_compute_keeps_everything_fp32_in_both_layouts(tiny_model_dir):
    from memfit.precision import resolve_precision
    from memfit.train.model import load_model

    for upcast in (False, True):
        config = TrainConfig(method="qlora", dtype="fp32", qlora_upcast=upcast, seq_len=32)
        roles = _layout(load_model(tiny_model_dir, config, resolve_precision("fp32", "cpu")))
        assert set(roles["unquantized"].values()) == {torch.float32} == set(roles["trained"].values())


@pytest.mark.parametrize("quant", ["4", "8"])
def test_the_estimate_follows_the_layout(quant):
    """Upcast costs 2 more bytes for each unquantized weight under bf16, and the notes say which layout."""
    hf_config = get_architecture("llama-3.2-1b").to_hf_config()
    info = arch_info(hf_config)
    hardware = Hardware("cuda", 24 * GB)
    base = TrainConfig(method="qlora", quant=quant, dtype="bf16", seq_len=256)
    default = estimate_memory(hf_config, base, hardware)
    upcast = estimate_memory(hf_config, base.updated(qlora_upcast=True), hardware)
    unquantized = info.params - info.linear_weight_params - info.expert_params
    assert unquantized > 0.2e9  # llama-3.2-1b: 128k x 2048 embeddings (tied), norms
    assert upcast.breakdown["weights"] - default.breakdown["weights"] == 2 * unquantized
    assert upcast.total_bytes > default.total_bytes + 2 * unquantized * 0.99
    assert any("embeddings, norms and lm_head in bf16, the compute dtype" in note for note in default.notes)
    assert any("embeddings, norms and lm_head in fp32 (--qlora-upcast" in note for note in upcast.notes)
    assert any(("4-bit nf4" if quant == "4" else "8-bit") in note for note in default.notes)
    # fp32 compute (CPU's default): both layouts are fp32, one estimate.
    cpu = Hardware("cpu", 64 * GB)
    fp32 = base.updated(dtype="fp32", seq_len=64)
    assert (estimate_memory(hf_config, fp32, cpu).breakdown["weights"]
            == estimate_memory(hf_config, fp32.updated(qlora_upcast=True), cpu).breakdown["weights"])


def test_the_flag_changes_nothing_without_a_kbit_base():
    hf_config = get_architecture("tiny").to_hf_config()
    hardware = Hardware("cpu", 8 * GB)
    config = TrainConfig(method="lora", seq_len=64)
    assert (estimate_memory(hf_config, config, hardware).breakdown
            == estimate_memory(hf_config, config.updated(qlora_upcast=True), hardware).breakdown)


def test_advice_offers_dropping_the_upcast_where_it_saves_something():
    from memfit.estimate.advice import knobs

    hf_config = get_architecture("tiny").to_hf_config()
    cuda = Hardware("cuda", 1 * GB)
    upcast = TrainConfig(method="qlora", dtype="bf16", qlora_upcast=True)
    offered = {knob.flags: knob for knob in knobs(hf_config, upcast, cuda)}
    assert offered["--no-qlora-upcast"].update == {"qlora_upcast": False}
    # Not where it is already off, nor where the compute dtype is fp32 (both layouts are fp32 there).
    assert "--no-qlora-upcast" not in {k.flags for k in knobs(hf_config, upcast.updated(qlora_upcast=False), cuda)}
    assert "--no-qlora-upcast" not in {k.flags for k in knobs(hf_config, upcast.updated(dtype="fp32"), cuda)}


def test_a_checkpoint_from_before_the_flag_resumes_upcast():
    """memfit before `qlora_upcast` always upcast a k-bit base: its checkpoints resume that way, no conflict."""
    old_qlora = {key: value for key, value in TrainConfig(method="qlora").model_dump().items()
                 if key != "qlora_upcast"}
    assert saved_config_values(old_qlora)["qlora_upcast"] is True
    assert resume_conflicts(old_qlora, TrainConfig(**saved_config_values(old_qlora))) == []
    assert resume_conflicts(old_qlora, TrainConfig(method="qlora")) == ["--qlora-upcast True -> False"]
    old_lora = {key: value for key, value in TrainConfig(method="lora").model_dump().items()
                if key != "qlora_upcast"}
    assert "qlora_upcast" not in saved_config_values(old_lora)
    assert resume_conflicts(old_lora, TrainConfig(method="lora")) == []
    # A checkpoint that wrote the key keeps it.
    new_qlora = TrainConfig(method="qlora").model_dump()
    assert saved_config_values(new_qlora)["qlora_upcast"] is False
    assert resume_conflicts(new_qlora, TrainConfig(method="qlora")) == []


def test_an_old_qlora_checkpoint_resumes_upcast_and_exactly(tiny_model_dir, tmp_path, capsys):
    """`memfit train --resume` of a checkpoint whose config has no `qlora_upcast` (as memfit wrote it before the
    flag, when it always upcast) continues upcast: the same losses as the run it came from."""
    import json

    from memfit.cli import main

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} about memory and machines"}) + "\n" for i in range(16)))
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out),
                 "--method", "qlora", "--qlora-upcast", "--seq-len", "32", "--batch-size", "2", "--device", "cpu",
                 "--max-steps", "4", "--save-every", "2"]) == 0
    straight = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    checkpoint = out / "checkpoints" / "step-2"
    meta = json.loads((checkpoint / "meta.json").read_text())  # meta.json holds the other files' checksums
    del meta["config"]["qlora_upcast"]
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["train", "--resume", str(checkpoint)]) == 0, capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["config"]["qlora_upcast"] is True
    resumed = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert resumed == straight and len(resumed) == 4
