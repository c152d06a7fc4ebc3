"""examples/*.yaml never rot: `memfit estimate -c` on each gives what examples/*.estimate.json holds (written by
examples/regenerate.py). A renamed config key fails here (the file no longer parses: exit 2), and so does any
change in the estimator's numbers beyond 1% of a byte count, or any change at all in the counts and verdicts."""

import json
from pathlib import Path

import pytest

from memfit.cli import main
from memfit.config import TrainConfig
from memfit.estimate import baseline

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = sorted(EXAMPLES.glob("*.yaml"))
EXPECTED_NAMES = {"qlora-8b-24gb", "lora-mac-16gb", "full-1b", "zero3-70b-8gpu", "cpu-demo"}
# Compared exactly: what a user reads off as the answer (and the settings it was computed for).
EXACT = ("model", "device", "num_gpus", "zero", "offload", "precision", "params", "trainable_params", "fits",
         "max_batch_size", "grad_accum", "config", "notes")
# Compared within 1%: byte counts (a refactor that moves a few bytes between terms is not a regression).
BYTES = ("total_bytes", "allocated_peak_bytes", "reserved_peak_bytes", "process_bytes", "training_bytes",
         "load_peak_bytes", "device_memory_bytes", "host_offload_bytes")


def test_every_example_is_there_with_its_estimate():
    assert {config.stem for config in CONFIGS} == EXPECTED_NAMES
    assert {path.name.removesuffix(".estimate.json") for path in EXAMPLES.glob("*.estimate.json")} == EXPECTED_NAMES
    for config in CONFIGS:
        text = config.read_text()
        assert text.startswith("#") and f"-c examples/{config.name}" in text  # says what it is and how to run it


@pytest.mark.parametrize("config", CONFIGS, ids=[config.stem for config in CONFIGS])
def test_estimate_of_the_example_matches_the_checked_in_output(config, capsys, monkeypatch):
    recorded = json.loads(config.with_suffix(".estimate.json").read_text())
    file_pages = recorded["measured_here"].get("cpu_file_pages_bytes")
    if file_pages is not None:
        # The one machine-dependent input of a CPU estimate, pinned to what the recording machine read.
        monkeypatch.setattr(baseline, "cpu_file_pages_bytes", lambda: file_pages)
    code = main(["estimate", "-c", str(config), "--json", "--no-calibrate"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    now, then = json.loads(captured.out), recorded["output"]
    for key in EXACT:
        assert now[key] == then[key], f"{config.name}: {key} {then[key]!r} -> {now[key]!r} (examples/regenerate.py)"
    assert now["breakdown"].keys() == then["breakdown"].keys()
    for key, value in [*((k, then[k]) for k in BYTES), *then["breakdown"].items()]:
        current = now[key] if key in BYTES else now["breakdown"][key]
        assert current == pytest.approx(value, rel=0.01, abs=1024), f"{config.name}: {key} {value} -> {current}"
    # Every example is one the user can run: it fits where it says.
    assert now["fits"] and now["max_batch_size"] >= now["config"]["batch_size"]


def test_example_keys_are_the_flags_names(tmp_path):
    """The files hold only keys `train -c` takes too, and the config they describe is valid."""
    from memfit.cli import read_config_file

    for config in CONFIGS:
        values = read_config_file(config)
        TrainConfig(**{key: value for key, value in values.items() if key in TrainConfig.model_fields})
        assert {"model", "data", "output_dir", "device", "memory_gb"} <= set(values), config.name


def test_a_renamed_key_is_caught(tmp_path, capsys):
    text = (EXAMPLES / "cpu-demo.yaml").read_text().replace("lora_rank:", "lora_rnak:")
    broken = tmp_path / "broken.yaml"
    broken.write_text(text)
    assert main(["estimate", "-c", str(broken), "--json"]) == 2
    assert "lora_rnak" in capsys.readouterr().err
