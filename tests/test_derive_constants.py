"""The estimator's CPU baseline comes from benchmarks/derive_constants.py's measurement, not from hand-set numbers:
the module's constants are constants.json's, which records the machine, versions and command that measured them."""

import importlib.util
import json
from pathlib import Path

from memfit.estimate import memory

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("derive_constants", ROOT / "benchmarks" / "derive_constants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_estimator_reads_the_constants_the_script_wrote():
    data = json.loads((ROOT / "src" / "memfit" / "estimate" / "constants.json").read_text())
    assert data["command"].startswith("python benchmarks/derive_constants.py")
    assert data["machine"]["cores"] and data["versions"]["torch"] and data["repeats"] >= 3
    cpu = data["cpu"]
    assert memory.CPU_PROCESS_ANON_BYTES == cpu["process_anon_bytes"]
    assert memory.CPU_PEFT_IMPORT_BYTES == cpu["peft_import_bytes"]
    assert memory.CPU_BITSANDBYTES_IMPORT_BYTES == cpu["bitsandbytes_import_bytes"]
    assert memory.CPU_FILE_PAGES_RATIO == cpu["file_pages_ratio"]
    assert memory.CPU_FILE_PAGES_FALLBACK_BYTES == cpu["file_pages_fallback_bytes"]
    # Each constant is a reading the file keeps: the training children's and the estimating processes' medians.
    readings = data["readings"]
    assert cpu["process_anon_bytes"] == readings["train-full"]["RssAnon"]["median"]
    assert cpu["file_pages_fallback_bytes"] == readings["estimate-lora"]["RssFile"]["median"]


def test_derive_takes_medians_and_differences():
    def reading(anon, file):
        return {"RssAnon": anon, "RssFile": file, "VmHWM": anon + file}

    readings = {
        "train-full": [reading(270, 160), reading(272, 160), reading(900, 160)],  # an outlier: the median ignores it
        "train-lora": [reading(271, 160)] * 3,
        "train-qlora": [reading(314, 162)] * 3,
        "estimate-full": [reading(260, 140)] * 3,
        "estimate-lora": [reading(271, 142)] * 3,
        "estimate-qlora": [reading(271, 142)] * 3,
    }
    derived = _script().derive(readings)
    assert derived["process_anon_bytes"] == 272
    assert derived["peft_import_bytes"] == 314 - 272
    assert derived["bitsandbytes_import_bytes"] == 314 - 271
    assert derived["file_pages_ratio"] == round(sorted([160 / 140, 160 / 142, 162 / 142])[1], 3)
    assert derived["file_pages_fallback_bytes"] == 142
