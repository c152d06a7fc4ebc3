"""memfit train end to end on the tiny model: run dir, exact resume, OOM recovery, QLoRA, distrust, bad input."""

import json
import os
import signal
from importlib import resources
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memfit import faults
from memfit.cli import main
from memfit.config import TrainConfig
from memfit.train import TrainJob, train
from memfit.train.checkpoint import open_checkpoint
from memfit.events import EvalEnd, StepEnd

DEMO_DATA = Path(str(resources.files("memfit").joinpath("data/demo.jsonl")))
FAST = dict(seq_len=64, batch_size=4, lr=1e-2, warmup_steps=1, memory_sample_interval=0.05)


def _train(model_dir, out, steps=6, events=None, resume=None, data=DEMO_DATA, **overrides):
    config = TrainConfig(**{**FAST, "max_steps": steps, **overrides})
    job = TrainJob(model=str(model_dir), data=data, output_dir=out, device="cpu", resume=resume)
    return train(job, config, on_event=events.append if events is not None else None)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _inject(monkeypatch, spec):
    monkeypatch.setenv(faults.ENV, spec)
    faults._faults.cache_clear()


def test_lora_run_writes_the_run_dir_and_a_loadable_adapter(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    events, out = [], tmp_path / "run"
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"text": f"Validation line {i} about memory and machines."}) + "\n"
                           for i in range(6)))
    config = TrainConfig(**FAST, max_steps=8, eval_every=4)
    result = train(TrainJob(str(tiny_model_dir), DEMO_DATA, out, val_data=val, device="cpu"), config, events.append)
    assert (result.status, result.exit_code, result.step) == ("done", 0, 8)

    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, 9))
    for key in ("loss", "avg_loss", "lr", "tokens_per_s", "watched_bytes", "rss_bytes", "peak_rss_bytes",
                "system_available_bytes", "micro_batch", "grad_accum", "time"):
        assert key in metrics[0], key
    assert metrics[0]["lr"] > metrics[-1]["lr"]  # warmup then cosine decay
    assert sum(m["loss"] for m in metrics[-3:]) / 3 < metrics[0]["loss"]
    assert [e.step for e in events if isinstance(e, EvalEnd)] == [4, 8]

    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "done" and run["config"]["max_steps"] == 8
    assert {"torch", "transformers", "peft", "accelerate"} <= set(run["versions"])
    assert run["hardware"]["ram_total_bytes"] > 0 and run["limit"]["auto"] is True
    assert run["data_stats"]["records"] == 330
    assert 0 < run["guard_thread_cpu_s"] < 1.0  # ten readings a second of tens of microseconds each

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model = PeftModel.from_pretrained(base, str(out / "final"))
    saved = load_file(out / "checkpoints" / "step-8" / "trainable.safetensors")
    loaded = dict(model.named_parameters())
    assert saved and all(torch.equal(loaded[name], tensor) for name, tensor in saved.items())
    assert AutoTokenizer.from_pretrained(str(out / "final")).eos_token == "<|endoftext|>"


def test_resume_is_exact(tiny_model_dir, tmp_path):
    """8 steps straight == 4 steps, SIGINT, resume for 4 more: identical losses and adapter weights.
    LoRA dropout is on, so the restored RNG state matters too."""
    straight = tmp_path / "straight"
    assert _train(tiny_model_dir, straight, steps=8, lora_dropout=0.1).exit_code == 0

    split = tmp_path / "split"

    def interrupt_at_4(event):
        if isinstance(event, StepEnd) and event.step == 4:
            os.kill(os.getpid(), signal.SIGINT)  # through the real signal handler

    config = TrainConfig(**FAST, max_steps=8, lora_dropout=0.1)
    first = train(TrainJob(str(tiny_model_dir), DEMO_DATA, split, device="cpu"), config, interrupt_at_4)
    assert (first.status, first.exit_code, first.step) == ("interrupted", 130, 4)
    assert first.resume_command == f"memfit train --resume {split / 'checkpoints' / 'step-4'}"
    second = _train(tiny_model_dir, split, steps=8, lora_dropout=0.1, resume=open_checkpoint(first.checkpoint))
    assert (second.status, second.step) == ("done", 8)

    assert [m["loss"] for m in _metrics(split)] == [m["loss"] for m in _metrics(straight)]
    a = load_file(straight / "final" / "adapter_model.safetensors")
    b = load_file(split / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_qlora_4bit_trains_on_cpu(tiny_model_dir, tmp_path):
    import bitsandbytes as bnb

    from memfit.precision import resolve_precision
    from memfit.train.model import load_model

    config = TrainConfig(**FAST, method="qlora", max_steps=3)
    model = load_model(tiny_model_dir, config, resolve_precision("auto", "cpu"), "cpu")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    result = _train(tiny_model_dir, tmp_path / "run", steps=3, method="qlora")
    assert result.exit_code == 0
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in _metrics(tmp_path / "run"))
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("mode", ["weight", "add"])
def test_distrust_loss_trains_and_logs_its_term(tiny_model_dir, tmp_path, mode):
    _train(tiny_model_dir, tmp_path / "run", steps=3, loss="distrust", distrust_mode=mode)
    metrics = _metrics(tmp_path / "run")
    assert all(m["distrust_term"] > 0 for m in metrics)
    if mode == "add":
        assert all(m["loss"] == pytest.approx(m["ce"] + m["distrust_term"]) for m in metrics)


def test_full_fine_tune_trains(tiny_model_dir, tmp_path):
    result = _train(tiny_model_dir, tmp_path / "run", steps=3, method="full", optimizer="adafactor")
    assert result.exit_code == 0
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


# --- bad input: one line, exit 2, nothing written ----------------------------------------------------------------


BAD_DATA = [
    (b'{"text": "ok"}\n{"text": "broken\n', "data.jsonl:2: not valid JSON"),
    (b'{"text": "ok"}\n{"body": "p"}\n', 'data.jsonl:2: missing "text"'),
    (b'{"text": 5}\n', 'data.jsonl:1: "text" must be a string'),
    (b"", "data.jsonl: no training samples"),
    (b'{"text": "ok", "auth_weight": 1.5, "prov_entropy": 1.0}\n', "data.jsonl:1: "),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "data.jsonl:2: not valid UTF-8"),
]


@pytest.mark.parametrize("content,message", BAD_DATA)
def test_bad_data_is_one_line_with_file_and_line(tiny_model_dir, tmp_path, capsys, content, message):
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (out / "checkpoints").exists()


def test_out_of_range_auth_weight_names_the_field(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "ok", "auth_weight": 0.5, "prov_entropy": 1}\n'
                    '{"text": "ok", "auth_weight": 1.5, "prov_entropy": 1}\n')
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir",
                 str(tmp_path / "run"), "--loss", "distrust"])
    err = capsys.readouterr().err
    assert code == 2 and "data.jsonl:2:" in err and "auth_weight" in err


def test_bad_model_paths(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hello"}\n')
    missing = main(["train", "--model", str(tmp_path / "nope"), "--data", str(data), "-o", str(tmp_path / "a")])
    assert missing == 2 and "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty_model"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 100, "hidden_size": 8,
                                                   "intermediate_size": 16, "num_hidden_layers": 1,
                                                   "num_attention_heads": 2}))
    code = main(["train", "--model", str(empty), "--data", str(data), "-o", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and "weights" in err and err.count("\n") == 1


def test_an_existing_run_is_never_overwritten(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    _train(tiny_model_dir, out, steps=1)
    before = (out / "metrics.jsonl").read_text()
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(DEMO_DATA), "-o", str(out)])
    assert code == 2 and "already holds a run" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before


def test_config_file_supplies_everything_and_flags_override(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: {DEMO_DATA}\noutput_dir: {out}\nseq_len: 64\n"
                      "batch_size: 2\nmax_steps: 5\nlora_rank: 4\ndevice: cpu\n")
    assert main(["train", "-c", str(config), "--max-steps", "2"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert (run["config"]["max_steps"], run["config"]["lora_rank"], run["config"]["seq_len"]) == (2, 4, 64)
    # The run dir's config.yaml is itself a valid -c file: it reproduces the run.
    assert "lora_rank: 4" in (out / "config.yaml").read_text()


@pytest.mark.parametrize("lines", [
    [{"prompt": f"Question {i}: what does a guard do?", "completion": " It watches memory and stops in time."}
     for i in range(8)],
    [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hi {i}"},
                   {"role": "assistant", "content": "Hello, how can I help?"}]} for i in range(8)],
])
def test_prompt_completion_and_chat_data_train(tiny_model_dir, tmp_path, lines):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    events = []
    result = _train(tiny_model_dir, tmp_path / "run", steps=2, data=data, events=events)
    assert result.exit_code == 0
    stats = json.loads((tmp_path / "run" / "run.json").read_text())["data_stats"]
    assert stats["packed"] is False and stats["records"] == 8 and 0 < stats["scored_tokens"] < stats["tokens"]


def test_leak_is_reported_with_its_rate_and_memory_reports_follow_the_interval(tiny_model_dir, tmp_path,
                                                                               monkeypatch):
    from memfit.events import GuardNotice, MemoryReport

    _inject(monkeypatch, "leak@30")
    events = []
    try:
        result = _train(tiny_model_dir, tmp_path / "run", steps=24, events=events, memory_report_interval=10)
    finally:
        faults._leaked.clear()
    assert result.exit_code == 0
    leaks = [e for e in events if isinstance(e, GuardNotice) and e.kind == "leak"]
    assert len(leaks) == 1 and "MB/step" in leaks[0].message
    rate = float(leaks[0].message.split(" MB/step")[0].split()[-1])
    assert 20 <= rate <= 40  # 30 MB a step were retained
    assert [e.step for e in events if isinstance(e, MemoryReport)] == [10, 20]


def test_out_of_memory_while_loading_is_one_line_and_exit_4(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import memfit.train.model

    def no_room(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(memfit.train.model, "load_model", no_room)
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(DEMO_DATA), "-o", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 4 and "out of memory while loading" in err and err.count("\n") == 1


def test_packed_samples_score_as_if_alone(tiny_model_dir, tmp_path):
    """The same samples evaluated packed and one per row: the same loss when the packed samples are kept apart by
    their position ids, a different one when they can attend to each other (packing with a 2D mask)."""
    from memfit.train.loop import Trainer

    data = tmp_path / "short.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}:", "completion": f" answer {i} is {i * 7}."}) + "\n"
                            for i in range(12)))
    results = {}
    for name, packing, isolated in [("alone", False, True), ("packed", True, True), ("leaky", True, False)]:
        events = []
        job = TrainJob(str(tiny_model_dir), data, tmp_path / name, val_data=data, device="cpu")
        trainer = Trainer(job, TrainConfig(**{**FAST, "packing": packing, "max_steps": 1}), events.append)
        trainer.setup()
        try:
            trainer.position_packing = isolated
            trainer.evaluate()
        finally:
            trainer.guard.stop()
        evaluated = next(event for event in events if isinstance(event, EvalEnd))
        results[name] = (evaluated.val_loss, evaluated.val_tokens, len(trainer.val_dataset.rows))
    assert results["packed"][2] < results["alone"][2] == 12  # really packed: fewer rows
    assert results["packed"][1] == results["alone"][1]  # the same scored tokens
    assert results["packed"][0] == pytest.approx(results["alone"][0], rel=1e-5)
    assert abs(results["leaky"][0] - results["alone"][0]) > 1e-3


def test_losses_are_read_back_once_per_log_interval(tiny_model_dir, tmp_path):
    """--log-every 3: step ends arrive in threes (one host sync each), with the same numbers as logging every step."""
    from memfit.train.loop import Trainer

    runs = {}
    for every in (1, 3):
        arrivals = []
        config = TrainConfig(**{**FAST, "max_steps": 7, "log_every": every})
        trainer = Trainer(TrainJob(str(tiny_model_dir), DEMO_DATA, tmp_path / f"every-{every}", device="cpu"),
                          config, lambda event: arrivals.append((event, getattr(trainer, "step", 0))))
        trainer.setup()
        try:
            trainer.run()
        finally:
            trainer.restore_head()
            trainer.guard.stop()
        runs[every] = [(event.step, step, event.loss) for event, step in arrivals if isinstance(event, StepEnd)]
    assert [(s, t) for s, t, _ in runs[3]] == [(1, 3), (2, 3), (3, 3), (4, 6), (5, 6), (6, 6), (7, 7)]
    assert [(s, t) for s, t, _ in runs[1]] == [(s, s) for s in range(1, 8)]
    assert [loss for *_, loss in runs[3]] == pytest.approx([loss for *_, loss in runs[1]], rel=1e-6)


def test_a_probe_trial_trains_the_runs_own_batches_and_its_longest_row(tiny_model_dir, tmp_path):
    """A trial stands for the run: the same first batches (not only the longest rows, whose one repeated shape
    read low), with a row of the longest length put into its last batch."""
    from memfit.data import RowOrder

    lines = [json.dumps({"text": f"short row number {i}."}) for i in range(40)]
    lines.append(json.dumps({"text": " ".join(f"word{i}" for i in range(60))}))
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    # A seed whose first three batches miss the long row (the last line), so the trial has to put it in.
    seed = next(seed for seed in range(50) if 40 not in RowOrder([1] * 41, seed, 4, False).rows(0, 12))
    settings = dict(data=data, steps=3, seed=seed, group_by_length=False, packing=False)
    assert _train(tiny_model_dir, tmp_path / "run", **settings).exit_code == 0
    config = TrainConfig(**{**FAST, "max_steps": 3, "seed": seed, "group_by_length": False, "packing": False})
    trial = train(TrainJob(str(tiny_model_dir), data, tmp_path / "trial", device="cpu", trial=True), config)
    assert trial.exit_code == 0
    run, tried = _metrics(tmp_path / "run"), _metrics(tmp_path / "trial")
    assert [(m["loss"], m["tokens"]) for m in tried[:2]] == [(m["loss"], m["tokens"]) for m in run[:2]]
    assert tried[2]["tokens"] > run[2]["tokens"] + 40  # a ~6-token row swapped for the ~60-token one
    assert not (tmp_path / "trial" / "checkpoints").exists() and not (tmp_path / "trial" / "final").exists()


def test_an_allocator_policy_from_the_environment_is_said_and_a_bad_one_is_refused_before_any_write(
        tiny_model_dir, tmp_path, monkeypatch):
    from memfit.errors import UserError
    from memfit.events import Notice

    monkeypatch.setenv("MEMFIT_MALLOC", "tcmalloc")
    with pytest.raises(UserError, match="MEMFIT_MALLOC='tcmalloc' is not an allocator policy"):
        _train(tiny_model_dir, tmp_path / "bad", steps=1)
    assert not (tmp_path / "bad").exists()
    monkeypatch.setenv("MEMFIT_MALLOC", "trim")
    events = []
    assert _train(tiny_model_dir, tmp_path / "trim", steps=2, events=events).exit_code == 0
    assert any(isinstance(e, Notice) and "trimmed at each step end" in e.message for e in events)


def test_the_default_allocator_policy_is_said_only_where_it_does_nothing():
    """Off glibc the mmap threshold cannot be set: the run says so once, at start; on glibc the default is silent."""
    from memfit.allocator import DEFAULT_POLICY, Allocator
    from memfit.distributed.ranks import Ranks
    from memfit.events import Notice
    from memfit.train.setup import start_guard

    said = []
    for effective in (True, False):
        notes = []
        _, guard = start_guard(TrainConfig(max_memory=8), "cpu", Ranks(), Allocator(DEFAULT_POLICY, effective),
                               notes.append)
        guard.stop()
        said.append([note.message for note in notes if isinstance(note, Notice) and "allocator" in note.message])
    assert said == [[], [f"allocator: {DEFAULT_POLICY} policy not applied (the C library is not glibc)"]]
