"""`--attn-implementation` a model cannot run (gemma-2 has no SDPA path in transformers 5): one line naming the
implementations that work, exit 2, in estimate and in train, instead of transformers' traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from memfit.config import make_config
from memfit.errors import UserError
from memfit.models import ARCHITECTURES
from memfit.models.attention import check_attn_implementation, supported_attn_implementations

SRC = Path(__file__).resolve().parents[1] / "src"


def test_gemma2_has_no_sdpa_and_says_what_works():
    gemma2 = ARCHITECTURES["gemma-2-2b"].to_hf_config()
    assert supported_attn_implementations(gemma2) == ["auto", "eager"]
    for ok in (None, "eager"):
        check_attn_implementation(gemma2, ok)
    with pytest.raises(UserError) as error:
        check_attn_implementation(gemma2, "sdpa")
    line = str(error.value)
    assert "Gemma2ForCausalLM" in line and "no sdpa attention" in line and "auto or eager" in line
    assert "\n" not in line
    llama = ARCHITECTURES["tiny"].to_hf_config()
    assert supported_attn_implementations(llama) == ["auto", "eager", "sdpa"]
    check_attn_implementation(llama, "sdpa")


def test_estimate_gemma2_sdpa_is_one_line_exit_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "memfit", "estimate", "--model", "gemma-2-2b",
                           "--attn-implementation", "sdpa", "--device", "cuda", "--memory-gb", "24"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert "--attn-implementation sdpa" in lines[0] and "auto or eager" in lines[0]


def test_train_loading_gemma2_with_sdpa_is_a_user_error(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from memfit.precision import resolve_precision
    from memfit.train.model import load_model

    config = ARCHITECTURES["gemma-2-2b"].to_hf_config(num_layers=1, vocab_size=256, hidden_size=32,
                                                      intermediate_size=64, num_attention_heads=2,
                                                      num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, attn_implementation="eager").save_pretrained(tmp_path / "gemma2")
    with pytest.raises(UserError, match="no sdpa attention"):
        load_model(tmp_path / "gemma2", make_config(method="lora", attn_implementation="sdpa"),
                   resolve_precision("fp32", "cpu"), "cpu")
    model = load_model(tmp_path / "gemma2", make_config(method="lora", attn_implementation="eager"),
                       resolve_precision("fp32", "cpu"), "cpu")
    assert model is not None
