"""memfit.libraries: PEFT imported without bitsandbytes where no 4/8-bit layer is built, and with it elsewhere."""

import json
import subprocess
import sys

import pytest

CHILD = """
import json, sys
from memfit import libraries
if sys.argv[1] == "hide":
    libraries.hide_bitsandbytes_from_peft()
libraries.import_peft()
seen = "bitsandbytes" in sys.modules
import torch
from peft import LoraConfig, get_peft_model
model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["0"]))
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
import bitsandbytes  # still importable afterwards (the 8-bit AdamW imports it directly)
print(json.dumps({"bitsandbytes_before": seen, "trainable": trainable}))
"""


@pytest.mark.parametrize("mode, imported", [("hide", False), ("keep", True)])
def test_peft_imports_bitsandbytes_only_where_asked(mode, imported):
    pytest.importorskip("bitsandbytes")
    done = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["bitsandbytes_before"] is imported
    assert result["trainable"] == 2 * (8 * 2)  # LoRA A and B of rank 2 on an 8x8 linear, either way


def test_quiet_keeps_the_users_offline_setting(monkeypatch):
    from memfit import libraries

    monkeypatch.delenv("MEMFIT_USER_HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    libraries.quiet()
    import os

    assert os.environ["MEMFIT_USER_HF_HUB_OFFLINE"] == "0"
