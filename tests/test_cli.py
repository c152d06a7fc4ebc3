"""The CLI contract: JSON on stdout, one-line errors with exit 2, no traceback."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from memfit import cli
from memfit.cli import main
from memfit.models import ALIASES, ARCHITECTURES

SRC = Path(__file__).resolve().parents[1] / "src"


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("argv, fragment", [
    (["estimate", "--model", "no-such-model"], "no-such-model"),
    (["estimate", "--model", "tiny", "--batch-size", "-1"], "--batch-size must be >= 1"),
    (["estimate", "--model", "tiny", "--lora-rank", "0"], "--lora-rank must be >= 1"),
    (["estimate", "--model", "tiny", "--seq-len", "0"], "--seq-len must be >= 1"),
    (["estimate", "--model", "tiny", "--memory-gb", "0"], "--memory-gb must be > 0"),
    (["estimate", "--model", "tiny", "--memory-gb", "-3"], "--memory-gb must be > 0"),
    (["estimate", "--model", "tiny", "--method", "dora"], "unknown --method 'dora'"),
    (["estimate", "--model", "tiny", "--optimizer", "lion"], "unknown --optimizer 'lion'"),
    (["estimate", "--model", "tiny", "--dtype", "fp8"], "unknown --dtype 'fp8'"),
    (["estimate", "--model", "tiny", "--batch-size", "many"], "--batch-size"),
    (["estimate", "--model", "tiny", "--zero", "5", "--num-gpus", "2"], "--zero must be"),
    (["estimate", "--model", "tiny", "--config", "/nonexistent/run.yaml"], "cannot read config"),
    (["estimate", "--model", "tiny", "--bogus-flag"], "bogus-flag"),
    (["init-model", "--preset", "llama-3.1-70b", "--out", "/tmp/memfit-never-written"], "--force"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, fragment):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert fragment in lines[0]
    assert "Traceback" not in err


def test_bad_config_file_names_the_line(tmp_path, capsys):
    bad = tmp_path / "run.yaml"
    bad.write_text("method: lora\nlora_rank: [oops\n")
    code, _, err = run_cli(capsys, "estimate", "--model", "tiny", "-c", str(bad))
    assert code == 2 and f"{bad}:" in err and len(err.strip().splitlines()) == 1
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("lora_rnak: 8\n")
    code, _, err = run_cli(capsys, "estimate", "--model", "tiny", "-c", str(unknown))
    assert code == 2 and "lora_rnak" in err


def test_config_file_values_and_flag_override(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("method: lora\nlora_rank: 4\nseq_len: 64\n")
    code, out, _ = run_cli(capsys, "estimate", "--model", "tiny", "--device", "cpu", "-c", str(config),
                           "--lora-rank", "8", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["config"]["lora_rank"] == 8 and data["config"]["seq_len"] == 64


def test_estimate_json_llama_8b_qlora(capsys):
    code, out, _ = run_cli(capsys, "estimate", "--model", "llama-3.1-8b", "--method", "qlora", "--seq-len", "2048",
                           "--batch-size", "1", "--memory-gb", "24", "--device", "cuda", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["params"] == 8_030_261_248
    for key in ("trainable_params", "breakdown", "total_bytes", "device_memory_bytes", "fits", "max_batch_size",
                "grad_accum", "notes"):
        assert key in data
    assert data["device_memory_bytes"] == 24 * 1024**3


def test_estimate_target_batch_sets_grad_accum(capsys):
    code, out, _ = run_cli(capsys, "estimate", "--model", "tiny", "--device", "cpu", "--memory-gb", "4",
                           "--batch-size", "4", "--target-batch", "32", "--json")
    data = json.loads(out)
    # The largest micro-batch that fits (up to the target), and the accumulation that makes up the rest.
    micro = min(data["max_batch_size"], 32)
    assert code == 0 and data["micro_batch_size"] == micro and data["grad_accum"] == -(-32 // micro)


def test_estimate_human_output(capsys):
    # At 3,072 tokens neither checkpointing nor ZeRO-3 offload fits alone: the cheapest change names both
    # (tests/test_estimate.py::test_suggestions_when_it_does_not_fit), so the flag is whole in its line.
    code, out, _ = run_cli(capsys, "estimate", "--model", "llama-3.1-8b", "--seq-len", "3072", "--device", "cuda",
                           "--memory-gb", "16", "--no-grad-checkpointing")
    assert code == 0
    assert "does not fit" in out and "what to change" in out and "--grad-checkpointing" in out


@pytest.mark.slow  # make test-all: 35 s (a cold CPU estimate); the loading peak itself is checked against a
# measured one in test_estimate_accuracy.py::test_loading_peak_of_a_converted_checkpoint
def test_estimate_shows_the_loading_peak_of_a_converted_checkpoint(capsys):
    args = ("estimate", "--model", "qwen2.5-0.5b", "--method", "lora", "--dtype", "fp32", "--seq-len", "128",
            "--device", "cpu", "--memory-gb", "64")
    code, out, _ = run_cli(capsys, *args, "--json")
    data = json.loads(out)
    assert code == 0 and data["load_peak_bytes"] > data["training_bytes"] == sum(data["breakdown"].values())
    assert data["total_bytes"] == data["load_peak_bytes"]
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and "loading peak" in out and "loading the checkpoint" in out


def test_system_and_models_json(capsys):
    code, out, _ = run_cli(capsys, "system", "--json")
    data = json.loads(out)
    assert code == 0 and data["ram_total_bytes"] > 0 and data["suggested_limit_bytes"] > 0
    assert isinstance(data["gpus"], list)
    code, out, _ = run_cli(capsys, "models", "--json")
    data = json.loads(out)
    names = {arch["name"] for arch in data["architectures"]}
    assert {"llama-3.1-8b", "tiny", "gpt2", "gemma-2-2b"} <= names
    assert {"hermes-3-8b", "llama-8b", "r1-distill-14b"} <= {alias["name"] for alias in data["aliases"]}
    rows = {arch["name"]: arch for arch in data["architectures"]}
    assert (rows["mixtral-8x7b"]["num_experts"], rows["mixtral-8x7b"]["experts_per_token"]) == (8, 2)
    assert (rows["qwen3-30b-a3b"]["num_experts"], rows["qwen3-30b-a3b"]["experts_per_token"]) == (128, 8)
    assert rows["mixtral-8x7b"]["params"] == 46_702_792_704
    assert (rows["llama-3.1-8b"]["num_experts"], rows["llama-3.1-8b"]["experts_per_token"]) == (None, None)


def _assert_full_models_listing(out: str) -> None:
    """Every built-in and alias name and repo id appears whole, on one line with what it belongs to."""
    assert "…" not in out and "..." not in out
    lines = out.splitlines()
    for arch in ARCHITECTURES.values():
        line = next(line for line in lines if line.split()[:1] == [arch.name])
        assert (arch.hf_id or "-") in line.split() and arch.model_type in line.split(), line
        if arch.num_experts:
            assert arch.experts_label in line.split(), line
    for alias in ALIASES.values():
        line = next(line for line in lines if line.split()[:1] == [alias.name])
        assert line.split()[1:] == [alias.hf_id, alias.architecture], line
    assert "mixtral-8x7b" in out and "8×top2" in out and "128×top8" in out


def test_models_piped_at_width_60_prints_full_names():
    """`COLUMNS=60 memfit models | cat`: a pipe gets the plain layout, whatever the width."""
    env = {**os.environ, "COLUMNS": "60", "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "memfit", "models"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "┃" not in done.stdout  # no box drawing in a pipe
    _assert_full_models_listing(done.stdout)


@pytest.mark.parametrize("width, table", [(60, False), (100, False), (200, True)])
def test_models_on_a_terminal_is_a_table_only_when_it_fits(monkeypatch, width, table):
    buffer = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=buffer, width=width, force_terminal=True, color_system=None))
    assert main(["models"]) == 0
    out = buffer.getvalue()
    assert ("┃" in out) is table
    if table:
        assert "…" not in out and all(arch.name in out and (arch.hf_id or "-") in out
                                      for arch in ARCHITECTURES.values())
        assert all(alias.hf_id in out for alias in ALIASES.values())
    else:
        _assert_full_models_listing(out)


def test_recommend_json_small_memory(capsys):
    """Slow (15-45 s): a cold `recommend` traces every built-in size and method once (the cache is empty in a test)."""
    code, out, _ = run_cli(capsys, "recommend", "--memory-gb", "16", "--device", "cuda", "--json")
    data = json.loads(out)
    assert code == 0
    row_70b = next(row for row in data["models"] if row["model"] == "llama-3.1-70b")
    assert not any(entry["fits"] for entry in row_70b["methods"].values())
    row_1b = next(row for row in data["models"] if row["model"] == "llama-3.2-1b")
    assert row_1b["methods"]["qlora"]["fits"] and row_1b["methods"]["qlora"]["max_batch_size"] >= 1
    assert data["largest"]["qlora"] is not None


def test_init_model_then_estimate_from_the_directory(tmp_path, capsys):
    out_dir = tmp_path / "tiny"
    code, _, err = run_cli(capsys, "init-model", "--preset", "tiny", "--out", str(out_dir))
    assert code == 0, err
    code, out, _ = run_cli(capsys, "estimate", "--model", str(out_dir), "--device", "cpu", "--json")
    assert code == 0 and json.loads(out)["fits"]


def test_console_script_exit_code():
    completed = subprocess.run([sys.executable, "-m", "memfit", "estimate", "--model", "nope"], capture_output=True,
                               text=True)
    assert completed.returncode == 2
    assert len(completed.stderr.strip().splitlines()) == 1 and "Traceback" not in completed.stderr
