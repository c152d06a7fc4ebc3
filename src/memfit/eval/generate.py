"""Completions for prompts with `model.generate`: greedy at temperature 0, else sampling; the chat template
for `messages` data (the conversation up to its last assistant turn, then the generation prompt)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from memfit.data.jsonl import Record
from memfit.errors import UserError


def prompt_ids(record: Record, tokenizer: Any, where: str) -> list[int]:
    """The token ids a record's completion is generated after."""
    if record.kind == "prompt_completion":
        return list(tokenizer(record.prompt, add_special_tokens=True, verbose=False)["input_ids"])
    if record.kind == "messages":
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f'{where}: the model\'s tokenizer has no chat template, so "messages" data can\'t be '
                            "used with it", hint='use "prompt"/"completion" lines instead')
        messages = list(record.messages)
        last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
        rendered = tokenizer.apply_chat_template([dict(m) for m in messages[:last]], tokenize=True,
                                                 add_generation_prompt=True)
        if hasattr(rendered, "keys"):  # transformers 5 returns a BatchEncoding
            rendered = rendered["input_ids"]
        return [int(token) for token in rendered]
    raise UserError(f'{where}: --generate needs prompts: "prompt"/"completion" or "messages" lines, or code tasks '
                    '("prompt" and "tests")', hint='"text" lines have no prompt to complete')


def text_prompt_ids(prompt: str, tokenizer: Any) -> list[int]:
    return list(tokenizer(prompt, add_special_tokens=True, verbose=False)["input_ids"])


@torch.no_grad()
def generate(model, tokenizer: Any, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
             batch_size: int, device, seed: int = 0,
             on_batch: Callable[[int, int], None] | None = None) -> list[str]:
    """One completion per prompt (token ids), decoded without special tokens. Prompts are left-padded in batches
    of `batch_size`; generation stops at the tokenizer's eos or after max_new_tokens."""
    from memfit.data import pad_token_id

    pad_id = pad_token_id(tokenizer)
    sampling = temperature > 0
    options = dict(max_new_tokens=max_new_tokens, do_sample=sampling, pad_token_id=pad_id,
                   eos_token_id=tokenizer.eos_token_id, use_cache=True)
    if sampling:
        options.update(temperature=temperature, top_k=0, top_p=1.0)
    else:  # a model's generation_config may ask for sampling knobs; greedy ignores them, say so explicitly
        options.update(temperature=None, top_k=None, top_p=None)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    completions: list[str] = []
    total = (len(prompts) + batch_size - 1) // batch_size
    try:
        for number, start in enumerate(range(0, len(prompts), batch_size), 1):
            chunk = prompts[start:start + batch_size]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, ids in enumerate(chunk):
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids):] = 1
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    **options)
            for row in range(len(chunk)):
                completions.append(tokenizer.decode(output[row, width:], skip_special_tokens=True))
            if on_batch is not None:
                on_batch(number, total)
    finally:
        torch.random.set_rng_state(generator_state)
    return completions
