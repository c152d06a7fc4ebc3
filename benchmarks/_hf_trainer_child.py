"""One HF contender of benchmarks/train_vs_hf.py, in its own process: `transformers.Trainer` + PEFT LoRA, or TRL's
`SFTTrainer`, on exactly the rows `memfit train --no-packing` builds from the same JSONL (memfit's own
`build_dataset`, imported here), then a JSON result file: per-step loss, tokens and times.

    python benchmarks/_hf_trainer_child.py SPEC.json

SPEC keys: trainer ("hf" | "trl"), model, data, result, steps, seq_len, batch_size, grad_accum, lr, lora_rank,
lora_alpha, seed, max_grad_norm, and optional args (extra TrainingArguments / SFTConfig fields, e.g.
{"train_sampling_strategy": "group_by_length"}).

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


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    started_process = time.time()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed
    from transformers.utils import logging as transformers_logging

    from memfit.data import build_dataset

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()

    tokenizer = AutoTokenizer.from_pretrained(spec["model"], local_files_only=True)
    dataset = build_dataset(spec["data"], tokenizer, spec["seq_len"], packing=False)
    rows = [{"input_ids": row.input_ids, "labels": row.labels} for row in dataset.rows]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin = 0.0
            self.steps: list[dict] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
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
        from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

        model = get_peft_model(model, lora)
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=rows,
                          processing_class=tokenizer, callbacks=[timer],
                          data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    elif spec["trainer"] == "trl":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        # SFTConfig's own defaults differ from the Trainer's: gradient checkpointing and bf16 on. Both off here, the
        # same fp32 step as every other contender. The rows carry "labels", so TRL keeps them as they are (-100 on
        # prompt tokens); max_length = seq_len truncates nothing more.
        config = SFTConfig(**{**dict(gradient_checkpointing=False, bf16=False, max_length=spec["seq_len"],
                                     packing=False, dataset_num_proc=None), **common})
        trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
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
        "steps": steps, "rows": len(rows), "data_stats": vars(dataset.stats),
        "batches_collated": len(counting.batches), "started": started_process,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }, indent=1))


if __name__ == "__main__":
    main()
