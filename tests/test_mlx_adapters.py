"""What an MLX run leaves for people to use: final/ in mlx-lm's adapter format (mlx_lm.load(..., adapter_path=...))
and a PEFT export that transformers + PEFT load on the same base with the same logits; the base quantized by MLX
(--quant 4|8) and DoRA."""

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

import memfit.data  # noqa: E402
from memfit.config import TrainConfig  # noqa: E402
from memfit.mlx import train_mlx  # noqa: E402
from memfit.train import TrainJob  # noqa: E402

DATA = Path(memfit.data.__file__).parent / "demo.jsonl"
IDS = [[3, 17, 200, 45, 99, 1000, 7, 8, 9, 10, 11, 12, 13, 14]]


def _config(**changes) -> TrainConfig:
    values = dict(max_steps=3, seq_len=64, lr=3e-2, batch_size=2, lora_rank=4, save_every=100, packing=False,
                  memory_sample_interval=0.05)
    return TrainConfig(**{**values, **changes})


def test_final_loads_in_mlx_lm_and_the_peft_export_gives_the_same_logits(tiny_model_dir, tmp_path, capsys):
    import mlx.core as mx
    import mlx_lm
    import torch
    from transformers import AutoModelForCausalLM

    from memfit.libraries import hide_bitsandbytes_from_peft, import_peft

    # The last 2 of 4 layers, two targets: PEFT's target_modules are then the full module paths.
    config = _config(lora_layers=2, lora_targets="q_proj,v_proj,down_proj", lora_alpha=12)
    val = tmp_path / "val.jsonl"
    val.write_text("".join(DATA.read_text().splitlines(keepends=True)[:8]))
    events = []
    result = train_mlx(TrainJob(model=str(tiny_model_dir), data=DATA, output_dir=tmp_path / "run", val_data=val),
                       config, on_event=events.append)
    assert result.exit_code == 0
    final = tmp_path / "run" / "final"
    mlx_config = json.loads((final / "adapter_config.json").read_text())
    assert mlx_config["fine_tune_type"] == "lora" and mlx_config["num_layers"] == 2
    assert mlx_config["lora_parameters"]["scale"] == 12 / 4
    model, tokenizer = mlx_lm.load(str(tiny_model_dir), adapter_path=str(final))
    adapted = np.array(model(mx.array(IDS)))
    base_model, _ = mlx_lm.load(str(tiny_model_dir))
    base = np.array(base_model(mx.array(IDS)))
    assert np.abs(adapted - base).max() > 1e-2  # the adapter changes the model (else the comparison proves nothing)
    assert isinstance(mlx_lm.generate(model, tokenizer, "The rings", max_tokens=4), str)

    peft_dir = final / "peft"
    peft_config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert peft_config["r"] == 4 and peft_config["lora_alpha"] == 12
    assert "model.layers.3.self_attn.q_proj" in peft_config["target_modules"]
    assert not any(".layers.0." in target or ".layers.1." in target for target in peft_config["target_modules"])
    hide_bitsandbytes_from_peft()
    import_peft()
    from peft import PeftModel
    from safetensors.torch import load_file

    keys = set(load_file(str(peft_dir / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight" in keys
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, str(peft_dir))
    with torch.no_grad():
        torch_logits = peft_model(torch.tensor(IDS)).logits.numpy()
    assert np.abs(torch_logits - adapted).max() < 1e-4

    # `memfit eval --adapter RUN` (torch + PEFT) finds the export, and its loss is the MLX run's validation loss.
    from memfit.cli import main

    assert main(["eval", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "run"), "--data", str(val),
                 "--seq-len", "64", "--json", "--out", str(tmp_path / "eval.jsonl")]) == 0
    evaluated = [event for event in events if type(event).__name__ == "EvalEnd"]
    assert len(evaluated) == 1
    samples = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    tokens = sum(sample["tokens"] for sample in samples)
    torch_loss = sum(sample["loss"] * sample["tokens"] for sample in samples) / tokens
    assert tokens == evaluated[0].val_tokens
    assert torch_loss == pytest.approx(evaluated[0].val_loss, abs=1e-4)

    # `memfit eval --engine mlx --adapter RUN`: mlx-lm's adapter on the MLX base, the same samples, per-sample losses
    # and tokens as torch + PEFT, and the trainer's own validation loss.
    capsys.readouterr()
    assert main(["eval", "--engine", "mlx", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "run"),
                 "--data", str(val), "--seq-len", "64", "--batch-size", "3", "--json",
                 "--out", str(tmp_path / "mlx.jsonl")]) == 0
    on_mlx = [json.loads(line) for line in (tmp_path / "mlx.jsonl").read_text().splitlines()]
    assert [(s["line"], s["tokens"]) for s in on_mlx] == [(s["line"], s["tokens"]) for s in samples]
    assert [s["loss"] for s in on_mlx] == pytest.approx([s["loss"] for s in samples], abs=1e-4)
    mlx_loss = sum(sample["loss"] * sample["tokens"] for sample in on_mlx) / tokens
    assert mlx_loss == pytest.approx(evaluated[0].val_loss, abs=1e-5)
    summary = json.loads(capsys.readouterr().out)
    assert summary["engine"] == "mlx" and summary["peak_mlx_bytes"] > 0


def test_a_4_bit_base_trains_and_its_adapter_loads(tiny_model_dir, tmp_path):
    import mlx.nn as nn
    import mlx_lm

    from memfit.mlx.model import load_for_training

    config = _config(quant="4", max_steps=3)
    loaded = load_for_training(tiny_model_dir, config)
    q_proj = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.linear, nn.QuantizedLinear) and q_proj.linear.bits == 4
    assert q_proj.linear.group_size == 64
    assert loaded.config["quantization"]["bits"] == 4
    trainable, total = loaded.counts()
    assert 0 < trainable < total

    result = train_mlx(TrainJob(model=str(tiny_model_dir), data=DATA, output_dir=tmp_path / "run"), config)
    assert result.exit_code == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    final = tmp_path / "run" / "final"
    assert json.loads((final / "adapter_config.json").read_text())["quantization"]["bits"] == 4
    model, _ = mlx_lm.load(str(tiny_model_dir), adapter_path=str(final))
    assert model is not None

    # `memfit eval --engine mlx` quantizes the base as the adapter's run did (its adapter_config.json says how).
    from memfit.cli import main
    from memfit.mlx.evaluate import load_for_eval

    evaluated, notes = load_for_eval(tiny_model_dir, final, "auto", "none", on_metal=False)
    assert isinstance(evaluated.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)
    assert evaluated.layers[0].self_attn.q_proj.linear.bits == 4 and any("4-bit" in note for note in notes)
    assert main(["eval", "--engine", "mlx", "--model", str(tiny_model_dir), "--adapter", str(final), "--data",
                 str(DATA), "--seq-len", "64", "--json"]) == 0


def test_eval_engine_mlx_refuses_generation_in_one_line(tiny_model_dir, capsys):
    from memfit.cli import main

    assert main(["eval", "--engine", "mlx", "--model", str(tiny_model_dir), "--data", str(DATA), "--generate"]) == 2
    err = capsys.readouterr().err
    assert "--engine mlx evaluates loss and perplexity" in err and "Traceback" not in err


def test_dora_trains_and_loads_in_mlx_lm(tiny_model_dir, tmp_path):
    import mlx_lm

    events = []
    result = train_mlx(TrainJob(model=str(tiny_model_dir), data=DATA, output_dir=tmp_path / "run"), _config(),
                       on_event=events.append, use_dora=True)
    assert result.exit_code == 0
    final = tmp_path / "run" / "final"
    assert json.loads((final / "adapter_config.json").read_text())["fine_tune_type"] == "dora"
    model, _ = mlx_lm.load(str(tiny_model_dir), adapter_path=str(final))
    assert type(model.layers[0].self_attn.q_proj).__name__ == "DoRALinear"
    assert not (final / "peft").exists()  # PEFT's LoRA cannot express DoRA's magnitude: said, not written
    assert any("PEFT export leaves out" in getattr(event, "message", "") for event in events)


def test_an_8_bit_base_keeps_the_group_layout(tiny_model_dir):
    import mlx.core as mx
    import mlx.nn as nn

    from memfit.mlx.model import load_for_training

    loaded = load_for_training(tiny_model_dir, _config(quant="8", lora_targets="q_proj,v_proj"))
    layer = loaded.model.layers[0]
    assert isinstance(layer.self_attn.q_proj.linear, nn.QuantizedLinear) and layer.self_attn.q_proj.linear.bits == 8
    assert isinstance(layer.mlp.down_proj, nn.QuantizedLinear)  # not a target: quantized, no adapter
    assert set(loaded.adapter_config["lora_parameters"]["keys"]) == {"self_attn.q_proj", "self_attn.v_proj"}
    assert mx.isfinite(loaded.model(mx.array(IDS))).all().item()


def test_a_full_fine_tune_saves_every_weight_and_no_peft_adapter(tiny_model_dir, tmp_path):
    import mlx_lm

    result = train_mlx(TrainJob(model=str(tiny_model_dir), data=DATA, output_dir=tmp_path / "run"),
                       _config(method="full", max_steps=2, lr=1e-3))
    assert result.exit_code == 0
    final = tmp_path / "run" / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "full" and not (final / "peft").exists()
    model, _ = mlx_lm.load(str(tiny_model_dir), adapter_path=str(final))
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["trainable_params"] == run["total_params"] > 0
    assert model is not None
