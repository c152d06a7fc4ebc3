"""memfit eval on the tiny model: loss and perplexity (base, and base + an adapter from a real tiny run) equal a
direct transformers computation; --generate with code tasks end to end; bad input is one line and exit 2."""

import json
import math
from importlib import resources
from pathlib import Path

import pytest
import torch

from memfit.cli import main
from memfit.config import TrainConfig
from memfit.eval import EvalJob, codetasks, run_eval, sandbox
from memfit.eval.sandbox import STATUSES, Limits
from memfit.train import TrainJob, train

DEMO_DATA = Path(str(resources.files("memfit").joinpath("data/demo.jsonl")))
VAL_TEXTS = [f"Validation line {i}: " + "memory and machines " * (i % 4 + 1) for i in range(7)]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-run") / "run"
    config = TrainConfig(seq_len=64, batch_size=4, lr=1e-2, warmup_steps=1, max_steps=8,
                         memory_sample_interval=0.05)
    result = train(TrainJob(str(tiny_model_dir), DEMO_DATA, out, device="cpu"), config)
    assert result.exit_code == 0
    return out / "final"


@pytest.fixture
def val_file(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in VAL_TEXTS))
    return path


def _direct_loss(model, tokenizer) -> float:
    """Token-weighted mean next-token CE, one sample at a time, with transformers' own loss."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for text in VAL_TEXTS:
            ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
            input_ids = torch.tensor([ids])
            total += float(model(input_ids=input_ids, labels=input_ids).loss) * (len(ids) - 1)
            tokens += len(ids) - 1
    return total / tokens


def test_loss_of_the_base_and_of_base_plus_adapter_match_transformers(tiny_model_dir, adapter_dir, val_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    base = run_eval(EvalJob(model=str(tiny_model_dir), data=val_file, device="cpu", batch_size=3))
    tuned = run_eval(EvalJob(model=str(tiny_model_dir), data=val_file, adapter=adapter_dir.parent, device="cpu",
                             batch_size=4))
    for result in (base, tuned):
        assert (result.status, result.exit_code) == ("done", 0)
        assert result.summary["perplexity"] == pytest.approx(math.exp(result.summary["loss"]))
        assert result.summary["peak_watched_bytes"] > 0 and len(result.samples) == len(VAL_TEXTS)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert base.summary["loss"] == pytest.approx(_direct_loss(model, tokenizer), abs=1e-4)
    tuned_model = PeftModel.from_pretrained(model, str(adapter_dir))
    assert tuned.summary["loss"] == pytest.approx(_direct_loss(tuned_model, tokenizer), abs=1e-4)
    assert abs(tuned.summary["loss"] - base.summary["loss"]) > 1e-2  # the adapter changes the model
    assert tuned.summary["adapter"] == str(adapter_dir)
    # Per-sample losses weighted by their tokens give the file's loss back.
    weighted = sum(s["loss"] * s["tokens"] for s in base.samples) / sum(s["tokens"] for s in base.samples)
    assert weighted == pytest.approx(base.summary["loss"], abs=1e-9)


def test_cli_json_and_out_file(tiny_model_dir, val_file, tmp_path, capsys):
    out = tmp_path / "per-sample.jsonl"
    code = main(["eval", "--model", str(tiny_model_dir), "--data", str(val_file), "--device", "cpu", "--json",
                 "--out", str(out), "--max-memory", "8"])
    captured = capsys.readouterr()
    assert code == 0
    summary = json.loads(captured.out)
    assert summary["tokens"] > 0 and summary["limit_bytes"] == 8 * 1024**3 and summary["mode"] == "loss"
    assert "loss" in captured.err and "perplexity" in captured.err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["line"] for line in lines] == list(range(1, len(VAL_TEXTS) + 1))


def test_the_guard_stops_an_evaluation_over_its_limit(tiny_model_dir, val_file, capsys):
    code = main(["eval", "--model", str(tiny_model_dir), "--data", str(val_file), "--device", "cpu",
                 "--max-memory", "0.05"])
    assert code == 3
    assert "stopped by the memory guard" in capsys.readouterr().out


def _code_tasks(path: Path) -> Path:
    tasks = [
        {"id": "add", "prompt": "def add(a, b):\n", "tests": "assert add(1, 2) == 3", "prompt_in_program": True},
        {"id": "square", "prompt": "Write square(x) in Python.", "tests": "assert square(3) == 9"},
        {"prompt": "Write shout(s): s upper-cased with a '!'.", "tests": "assert shout('a') == 'A!'"},
    ]
    path.write_text("".join(json.dumps(task) + "\n" for task in tasks))
    return path


def test_generate_runs_code_tasks_in_the_sandbox_end_to_end(tiny_model_dir, tmp_path, capsys):
    if not sandbox.sandbox_support().available:
        pytest.skip(f"no sandbox on this machine: {sandbox.sandbox_support().reason}")
    data, out = _code_tasks(tmp_path / "code.jsonl"), tmp_path / "results.jsonl"
    code = main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--device", "cpu", "--generate",
                 "--max-new-tokens", "12", "--timeout", "5", "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["pass_at_1"] == 0.0 and summary["sandboxed"] is True  # random weights write no working code
    assert sum(summary["counts"].values()) == 3 and summary["counts"]["passed"] == 0
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in results] == ["add", "square", "3"]
    for result in results:
        assert result["status"] in STATUSES and result["status"] != "passed" and result["reason"]
        assert result["completion"] and result["sandboxed"] is True
    assert "task 1/3 add:" in captured.err


def test_pass_at_1_counts_the_programs_that_pass(tmp_path):
    if not sandbox.sandbox_support().available:
        pytest.skip(f"no sandbox on this machine: {sandbox.sandbox_support().reason}")
    tasks = codetasks.read_tasks(_code_tasks(tmp_path / "code.jsonl"))
    completions = ["    return a + b\n",  # continues the prompt's def
                   "Here you go:\n```python\ndef square(x):\n    return x * x\n```\n",
                   "def shout(s):\n    return s.upper()\n"]  # forgets the '!'
    results = codetasks.run_tasks(tasks, completions, Limits(wall_s=5), sandboxed=True)
    assert [r.run.status for r in results] == ["passed", "passed", "failed"]
    assert codetasks.pass_at_1(results) == pytest.approx(2 / 3)
    assert codetasks.status_counts(results)["failed"] == 1


def test_generate_with_chat_messages_writes_completions(tiny_model_dir, tmp_path):
    data, out = tmp_path / "chat.jsonl", tmp_path / "completions.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello"}]}) + "\n")
    result = run_eval(EvalJob(model=str(tiny_model_dir), data=data, device="cpu", generate=True, max_new_tokens=5,
                              out=out))
    assert result.exit_code == 0
    [line] = [json.loads(text) for text in out.read_text().splitlines()]
    assert line["prompt"] == [{"role": "user", "content": "Hi"}] and line["reference"] == "Hello"
    assert isinstance(line["completion"], str)


@pytest.mark.parametrize("lines, extra, message", [
    (['{"prompt": "p", "tests": "assert True"}', '{"prompt": "q"}'], ["--generate"],
     ':2: missing "tests"'),
    (['{"prompt": "p", "tests": "assert (("}'], ["--generate"], ':1: "tests" is not valid Python'),
    (['{"prompt": "p", "tests": "assert True", "id": 1}', '{"prompt": "q", "tests": "pass", "id": "1"}'],
     ["--generate"], ":2: id '1' is used by line 1 too"),
    (['{"prompt": "p", "tests": "assert True"}'], [], "have no reference to score a loss on"),
    (['{"text": "just text"}'], ["--generate"], ':1: --generate needs prompts'),
    (['{"text": "ok"}', "{not json"], [], ":2: not valid JSON"),
    (['{"text": "ok"}'], ["--adapter", "{tmp}"], "not a PEFT adapter"),
    (['{"text": "ok"}'], ["--batch-size", "0"], "--batch-size must be at least 1"),
    (['{"text": "ok"}'], ["--temperature", "-1"], "--temperature must be a number >= 0"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_model_dir, tmp_path, capsys, lines, extra, message):
    data, out = tmp_path / "data.jsonl", tmp_path / "out.jsonl"
    data.write_text("\n".join(lines) + "\n")
    extra = [arg.replace("{tmp}", str(tmp_path)) for arg in extra]
    code = main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--device", "cpu", "--out", str(out),
                 *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_code_tasks_are_refused_without_a_sandbox_unless_allowed(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sandbox, "_unshare_command", lambda: None)
    sandbox.sandbox_support.cache_clear()
    try:
        data, out = _code_tasks(tmp_path / "code.jsonl"), tmp_path / "results.jsonl"
        args = ["eval", "--model", str(tiny_model_dir), "--data", str(data), "--device", "cpu", "--generate",
                "--max-new-tokens", "4", "--out", str(out)]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "refusing to run generated code" in err and "--allow-unsandboxed" in err and not out.exists()
        assert main([*args, "--allow-unsandboxed", "--json"]) == 0
        captured = capsys.readouterr()
        assert json.loads(captured.out)["sandboxed"] is False and "NOT sandboxed" in captured.err
        assert all(json.loads(line)["sandboxed"] is False for line in out.read_text().splitlines())
    finally:
        sandbox.sandbox_support.cache_clear()


def test_a_4bit_base_evaluates_close_to_the_full_precision_one(tiny_model_dir, val_file):
    full = run_eval(EvalJob(model=str(tiny_model_dir), data=val_file, device="cpu"))
    nf4 = run_eval(EvalJob(model=str(tiny_model_dir), data=val_file, device="cpu", quant="4"))
    assert nf4.exit_code == 0 and nf4.summary["tokens"] == full.summary["tokens"]
    assert 0 < abs(nf4.summary["loss"] - full.summary["loss"]) < 0.05  # quantized, so not the same weights
