"""Config validation, system detection, the allocator setting."""

import pytest

from memfit import allocator
from memfit.allocator import fix_mmap_threshold
from memfit.config import TrainConfig, load_yaml, make_config
from memfit.errors import UserError
from memfit.precision import resolve_precision
from memfit.system import detect


def test_config_defaults_and_qlora_implies_4bit():
    config = make_config(method="qlora")
    assert config.quant == "4" and config.effective_lora_alpha == 2 * config.lora_rank
    assert make_config(method="qlora", quant="8").quant == "8"


@pytest.mark.parametrize("values", [dict(batch_size=0), dict(method="full", quant="4"), dict(distrust_alpha=5.0),
                                    dict(memory_threshold=1.5), dict(max_memory=-1)])
def test_config_rejects(values):
    with pytest.raises(UserError):
        make_config(**values)


def test_every_field_has_help():
    assert all(field.description for field in TrainConfig.model_fields.values())


def test_yaml_keys_accept_dashes(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora-rank: 8\nseq_len: 64\n")
    assert load_yaml(path) == {"lora_rank": 8, "seq_len": 64}


def test_precision_contract():
    assert resolve_precision("auto", "cpu").name == "fp32"
    mixed = resolve_precision("bf16", "cpu")
    assert mixed.autocast and mixed.trainable_bytes == 4 and mixed.frozen_bytes == 2
    pure = resolve_precision("bf16-pure", "cpu")
    assert not pure.autocast and pure.trainable_bytes == 2
    with pytest.raises(UserError):
        resolve_precision("fp16", "cpu")


def test_system_detects_memory():
    info = detect()
    assert info.ram_total_bytes >= info.ram_available_bytes > 0
    assert info.suggested_limit_bytes == int(info.ram_available_bytes * 0.8)
    assert info.device_memory_bytes("cpu") == info.suggested_limit_bytes
    assert info.cpu_count >= 1


def test_mmap_threshold_is_settable_on_linux():
    import sys

    assert fix_mmap_threshold() == sys.platform.startswith("linux")
