"""One set of defaults, visible: estimate, recommend, probe and train share TrainConfig's; every --help shows them;
the read commands list only the flags that change memory; recommend honours or refuses every flag."""

import json

import pytest

from memfit.cli import main
from memfit.config import GUARD_FIELDS, NO_MEMORY_FIELDS, TrainConfig
from memfit.estimate.memory import NOT_TRACED


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(autouse=True)
def _wide_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # --help unwrapped: rich would cut a flag name at its hyphens


def help_text(capsys, command):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    return " ".join(out.replace("│", " ").split())


def test_the_shared_defaults_are_what_people_train_with():
    config = TrainConfig()
    assert (config.seq_len, config.grad_checkpointing, config.batch_size) == (2048, True, 1)


@pytest.mark.parametrize("command", ["estimate", "recommend", "probe", "train"])
def test_every_training_flag_shows_its_default(capsys, command):
    text = help_text(capsys, command)
    assert "sequence length in tokens (default: 2048)" in text
    assert "(default: --grad-checkpointing)" in text and "(default: --no-qlora-upcast)" in text
    assert "(default: lora)" in text and "(default: auto)" in text


def test_the_demo_help_shows_the_demos_own_defaults(capsys):
    text = help_text(capsys, "demo")
    assert "(default: full)" in text and "sequence length in tokens (default: 128)" in text


def test_read_commands_list_only_flags_that_change_memory_and_still_take_the_others(capsys, tmp_path):
    assert NO_MEMORY_FIELDS <= (NOT_TRACED | {"lora_alpha"}) - {"batch_size", "grad_accum", "optimizer",
                                                                "distributed", "offload", "lora_layers"}
    for command in ("estimate", "recommend"):
        text = help_text(capsys, command)
        for name in NO_MEMORY_FIELDS | GUARD_FIELDS:
            assert f"--{name.replace('_', '-')} " not in text, (command, name)
        assert "--seq-len" in text and "--batch-size" in text and "--optimizer" in text
    assert "--lr " in help_text(capsys, "train") and "--warmup-steps" in help_text(capsys, "probe")
    # A train command's flags still work on estimate (copied over), and a -c file's keys too.
    config = tmp_path / "run.yaml"
    config.write_text("lr: 0.001\nwarmup_steps: 5\nmax_memory: 4\nseq_len: 64\n")
    code, out, _ = run_cli(capsys, "estimate", "--model", "tiny", "--device", "cpu", "--memory-gb", "4", "--lr",
                           "0.01", "-c", str(config), "--json")
    data = json.loads(out)
    assert code == 0 and data["config"]["lr"] == 0.01 and data["config"]["warmup_steps"] == 5


def test_estimate_uses_the_shared_defaults(capsys):
    code, out, _ = run_cli(capsys, "estimate", "--model", "tiny", "--device", "cpu", "--memory-gb", "4", "--json")
    config = json.loads(out)["config"]
    assert code == 0 and config == TrainConfig().model_dump()


def test_recommend_uses_the_shared_defaults_and_honours_method_and_quant(capsys, recommend_calls):
    code, out, _ = run_cli(capsys, "recommend", "--memory-gb", "24", "--device", "cuda", "--json")
    config, _, methods = recommend_calls[-1]
    assert code == 0 and methods == ("full", "lora", "qlora")
    assert config.model_dump() == TrainConfig().model_dump()  # no private seq/checkpointing overrides
    code, out, _ = run_cli(capsys, "recommend", "--memory-gb", "24", "--device", "cuda", "--method", "lora",
                           "--quant", "8", "--json")
    config, _, methods = recommend_calls[-1]
    assert code == 0 and methods == ("lora",) and config.quant == "8" and json.loads(out)["methods"] == ["lora"]


@pytest.mark.parametrize("flags, fragment", [
    (["--quant", "8"], "--quant 8 needs --method lora or qlora"),
    (["--offload", "cpu"], "does not take --offload cpu"),
    (["--distributed", "zero3"], "does not take --distributed zero3"),
    (["--method", "full", "--quant", "4"], "--quant 4 needs --method lora or qlora"),
])
def test_recommend_refuses_what_it_cannot_honour(capsys, recommend_calls, flags, fragment):
    code, out, err = run_cli(capsys, "recommend", "--memory-gb", "24", "--device", "cuda", *flags)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and fragment in err
    assert not recommend_calls


def test_recommend_computes_only_the_method_asked_for(monkeypatch):
    from memfit.estimate import recommend as module
    from memfit.estimate.memory import GB, Hardware

    monkeypatch.setattr(module, "SIZES", ("llama-3.2-1b",))
    result = module.recommend(TrainConfig(seq_len=256), Hardware("cuda", 4 * GB), methods=("qlora",))
    assert result["methods"] == ["qlora"] and list(result["models"][0]["methods"]) == ["qlora"]
    assert result["models"][0]["methods"]["qlora"]["fits"] and result["grad_checkpointing"] is True
