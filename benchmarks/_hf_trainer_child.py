"""One HF contender of benchmarks/train_vs_hf.py, in its own process: `transformers.Trainer` + PEFT LoRA in one of
three data layouts, or TRL's `SFTTrainer` with its own packing, then a JSON result file: per-step loss, tokens and
times, and this process's own peak RSS (VmHWM).

    python benchmarks/_hf_trainer_child.py SPEC.json

SPEC keys: trainer ("hf" | "trl"), layout (hf only: "padded" | "blocks" | "flat"), model, data, result, steps,
seq_len, batch_size, grad_accum, lr, lora_rank, lora_alpha, seed, max_grad_norm, malloc (a memfit allocator policy,
applied here exactly as `memfit train` applies it), and optional args (extra TrainingArguments / SFTConfig fields,
e.g. {"train_sampling_strategy": "group_by_length"}). Threads come from OMP_NUM_THREADS, set by the parent for every
contender alike.

Layouts (hf), each tokenized by memfit's own reader and tokenizer call, so every contender scores the same tokens:
- padded: one sample per row, cut at seq_len, right-padded per micro-batch (`DataCollatorForSeq2Seq`);
- blocks: every sample's tokens (uncut) concatenated and split into seq_len blocks, as transformers'
  `run_clm.py` `group_texts` does (attention crosses sample boundaries; nothing is padded);
- flat: one sample per row, cut at seq_len, a micro-batch flattened into one padding-free row with positions reset
  per sample (`DataCollatorWithFlattening`); transformers builds a mask that keeps samples apart from those positions.

Timing: a step is `on_step_begin` .. `on_step_end` (forward, backward, clipping, optimizer and scheduler steps) plus
the time the collator spent building that step's micro-batches. The Trainer collates a step's batches before
`on_step_begin` (and accelerate's loader collates one batch ahead), so collation is timed inside the wrapping collator
and given to the step that trains on the batch: batches are consumed in the order they are collated, `grad_accum`
per step. memfit's `step_time_s` covers the same work (collate, forward/backward, clip, optimizer, scheduler).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class CountingCollator:
    """Wraps the trainer's collator: per batch, in order, the real (non-pad) tokens and the seconds collating took."""

    def __init__(self, inner):
        self.inner = inner
        self.batches: list[tuple[int, float]] = []

    def __call__(self, features):
        started = time.perf_counter()
        batch = self.inner(features)
        elapsed = time.perf_counter() - started
        if "attention_mask" in batch:
            tokens = int(batch["attention_mask"].sum())
        else:  # padding-free layouts carry no mask: every position is a real token
            tokens = int(batch["input_ids"].numel())
        self.batches.append((tokens, elapsed))
        return batch


def own_peak_rss_bytes() -> int:
    """This process's high-water RSS (VmHWM): its own, whatever the parent's was."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def samples(spec: dict, tokenizer) -> list:
    """Every record of the data file tokenized by memfit (input_ids and labels, -100 on prompt tokens), uncut."""
    from memfit.data.formats import tokenize_record
    from memfit.data.jsonl import read_records

    return [tokenize_record(record, tokenizer, path=spec["data"]) for record in read_records(spec["data"])]


def rows_for(layout: str, spec: dict, tokenizer) -> list[dict]:
    seq_len = spec["seq_len"]
    tokenized = samples(spec, tokenizer)
    if layout in ("padded", "flat"):
        rows = [{"input_ids": s.input_ids[:seq_len], "labels": s.labels[:seq_len]} for s in tokenized]
        return [row for row in rows if any(label != -100 for label in row["labels"][1:])]
    if layout == "blocks":
        ids = [token for s in tokenized for token in s.input_ids]
        labels = [label for s in tokenized for label in s.labels]
        return [{"input_ids": ids[i:i + seq_len], "labels": labels[i:i + seq_len]}
                for i in range(0, len(ids) - seq_len + 1, seq_len)]
    raise SystemExit(f"unknown layout {layout!r}")


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    started_process = time.time()

    from memfit import allocator

    # The same policy memfit's trainer applies at start-up, and the same step-end call (a trim under "trim").
    chosen = allocator.configure(spec["malloc"])

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()

    tokenizer = AutoTokenizer.from_pretrained(spec["model"], local_files_only=True)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin = 0.0
            self.steps: list[dict] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            chosen.step_end()
            self.steps.append({"step": state.global_step, "compute_s": time.perf_counter() - self.begin,
                               "time": time.time()})

    timer = StepTimer()
    lora = LoraConfig(r=spec["lora_rank"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                      target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
    common = dict(
        output_dir=str(Path(spec["result"]).parent / "hf-out"), max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=spec["grad_accum"],
        learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=spec["max_grad_norm"],
        weight_decay=0.0, seed=spec["seed"], logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, **spec.get("args", {}),
    )
    # Seed before the adapters are made: LoRA's A matrices are drawn from the global RNG. memfit seeds at the same
    # point (and TRL's Trainer.__init__ seeds before it wraps the model), so all start from the same adapters.
    set_seed(spec["seed"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, local_files_only=True)

    if spec["trainer"] == "hf":
        from transformers import (DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer, TrainingArguments,
                                  default_data_collator)

        layout = spec["layout"]
        rows = rows_for(layout, spec, tokenizer)
        collator = {
            "padded": lambda: DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
            "blocks": lambda: default_data_collator,
            # separator_id -100: the first label of each flattened sample is not scored (it would be predicted
            # from the previous sample's last token), as in padded rows.
            "flat": lambda: DataCollatorWithFlattening(return_position_ids=True, separator_id=-100),
        }[layout]()
        model = get_peft_model(model, lora)
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=rows,
                          processing_class=tokenizer, callbacks=[timer], data_collator=collator)
    elif spec["trainer"] == "trl":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        from memfit.data.jsonl import read_records

        # TRL's own best settings for speed: best-fit-decreasing packing into max_length rows, padding-free (its
        # default with "bfd"), its own tokenization of the raw records (EOS added; completion-only loss for
        # prompt/completion data, every token for text). SFTConfig's defaults gradient_checkpointing=True and
        # bf16=True are turned off: the same fp32 step, no recompute, as every other contender.
        records = [{"text": r.text} if r.kind == "text" else {"prompt": r.prompt, "completion": r.completion}
                   for r in read_records(spec["data"])]
        rows = records
        config = SFTConfig(**{**dict(gradient_checkpointing=False, bf16=False, max_length=spec["seq_len"],
                                     packing=True, dataset_num_proc=None), **common})
        trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(records),
                             processing_class=tokenizer, peft_config=lora, callbacks=[timer])
    else:
        raise SystemExit(f"unknown trainer {spec['trainer']!r}")

    counting = CountingCollator(trainer.data_collator)
    trainer.data_collator = counting
    trainer.train()

    accum = spec["grad_accum"]
    losses = {int(entry["step"]): float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry}
    steps = []
    for number, step in enumerate(timer.steps):
        batches = counting.batches[number * accum:(number + 1) * accum]
        collate_s = sum(seconds for _, seconds in batches)
        steps.append({"step": step["step"], "loss": losses.get(step["step"]), "tokens": sum(t for t, _ in batches),
                      "step_time_s": step["compute_s"] + collate_s, "collate_s": collate_s, "time": step["time"]})
    Path(spec["result"]).write_text(json.dumps({
        "steps": steps, "rows": len(rows), "batches_collated": len(counting.batches), "started": started_process,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "peak_rss_bytes": own_peak_rss_bytes(), "threads": torch.get_num_threads(), "malloc": chosen.policy,
    }, indent=1))


if __name__ == "__main__":
    main()
