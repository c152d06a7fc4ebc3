"""`memfit train --engine mlx`: the CLI hook into memfit.mlx, its resume, and its one-line refusals."""

import json
from pathlib import Path

import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

import memfit.data  # noqa: E402
from memfit.cli import main  # noqa: E402
from memfit.errors import UserError  # noqa: E402

DATA = str(Path(memfit.data.__file__).parent / "demo.jsonl")


def _train(capsys, *argv):
    code = main(["train", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_engine_mlx_runs_the_seed_command_and_resumes(tiny_model_dir, tmp_path, capsys):
    """The seeds' flags (--quant 4 --max-memory --batch-size 1 --lora-rank 64) with memfit's names, on MLX; then a
    resume of the stopped run keeps the checkpoint's engine without --engine."""
    out = tmp_path / "run"
    code, stdout, stderr = _train(capsys, "--engine", "mlx", "--model", str(tiny_model_dir), "--data", DATA,
                                  "-o", str(out), "--quant", "4", "--max-memory", "8", "--batch-size", "1",
                                  "--lora-rank", "64", "--seq-len", "64", "--max-steps", "2", "--save-every", "1",
                                  "--no-packing")
    assert code == 0, stderr
    assert "80% of the 8.00 GB limit" in stdout and "finished 2 steps" in stdout
    run = json.loads((out / "run.json").read_text())
    assert run["engine"] == "mlx" and run["config"]["quant"] == "4" and run["config"]["lora_rank"] == 64
    assert (out / "final" / "adapters.safetensors").is_file()
    assert (out / "report.html").is_file()  # written by the entry point as the run ends (report_at_end)
    # More steps from the step-1 checkpoint (the effective config is the checkpoint's; --force for the new length).
    code, stdout, stderr = _train(capsys, "--resume", str(out / "checkpoints" / "step-1"), "--max-steps", "3",
                                  "--force", "-o", str(tmp_path / "more"))
    assert code == 0, stderr
    assert "resumed from" in stdout and "Set MLX memory limit" in stdout  # the MLX engine ran it


@pytest.mark.parametrize("extra, words", [
    (["--optimizer", "adamw8bit"], "bitsandbytes"),
    (["--reload-interval", "2"], "--reload-interval needs --supervise"),
    (["--distributed", "fsdp"], "--distributed fsdp"),
    # The MLX engine's own sentence, not the torch engine's (DDP cannot offload: use zero2 or fsdp).
    (["--offload", "cpu"], "--engine mlx cannot run --offload cpu (unified memory"),
])
def test_train_engine_mlx_refuses_in_one_line(tiny_model_dir, tmp_path, capsys, extra, words):
    code, stdout, stderr = _train(capsys, "--engine", "mlx", "--model", str(tiny_model_dir), "--data", DATA,
                                  "-o", str(tmp_path / "run"), *extra)
    assert code == 2
    assert words in stderr and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert not (tmp_path / "run").exists()


def test_unknown_engine_is_a_usage_error(tiny_model_dir, tmp_path, capsys):
    code, _, stderr = _train(capsys, "--engine", "jax", "--model", str(tiny_model_dir), "--data", DATA,
                             "-o", str(tmp_path / "run"))
    assert code == 2 and "--engine" in stderr


def test_auto_picks_mlx_only_on_apple_silicon(monkeypatch):
    import memfit.mlx as engines

    monkeypatch.setattr(engines, "apple_silicon", lambda: False)
    assert engines.choose_engine("auto") == "torch"
    monkeypatch.setattr(engines, "apple_silicon", lambda: True)
    assert engines.choose_engine("auto") == "mlx"  # mlx is importable here
    monkeypatch.setattr(engines, "available", lambda: False)
    assert engines.choose_engine("auto") == "torch"
    with pytest.raises(UserError) as caught:
        engines.choose_engine("mlx")
    assert "pip install 'memfit[mlx]'" in str(caught.value)
