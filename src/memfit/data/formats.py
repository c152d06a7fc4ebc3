"""Tokenize one record into input ids and labels (IGNORE_INDEX where no loss is wanted), per format.

- text: the whole sample is scored.
- prompt_completion: only the completion (and the eos that ends it) is scored.
- messages: rendered with the model's own chat template; only assistant turns are scored, each with the end
  marker the template closes it with, so the model learns to stop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memfit.data.jsonl import Record
from memfit.errors import UserError

# The label of a token no loss is taken on (the prompt, padding, row boundaries): PyTorch's cross-entropy
# ignore_index, which the losses (memfit.train.losses) use too.
IGNORE_INDEX = -100

TEMPLATE_HINT = 'use "text" or "prompt"/"completion" lines instead'


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE_INDEX where no loss
    record: Record


def tokenize_record(record: Record, tokenizer: Any, *, path: str | Path | None = None) -> TokenizedSample:
    """`path` only makes error messages read `file:line`; without it they read `line N`."""
    where = f"{path}:{record.line}" if path is not None else f"line {record.line}"
    if record.kind == "text":
        input_ids = _ids(tokenizer, record.text, special=True)
        if not input_ids or input_ids[-1] != tokenizer.eos_token_id:  # some tokenizers add eos themselves
            input_ids += _eos(tokenizer)
        return TokenizedSample(input_ids, list(input_ids), record)
    if record.kind == "prompt_completion":
        prompt = _ids(tokenizer, record.prompt, special=True)
        # No special tokens on the completion: it continues the prompt, it does not start a new sequence.
        completion = _ids(tokenizer, record.completion, special=False) + _eos(tokenizer)
        return TokenizedSample(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, record)
    if record.kind == "messages":
        return _tokenize_messages(record, tokenizer, where)
    raise ValueError(f"unknown record kind {record.kind!r}")


def _ids(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    # verbose=False: a long sample is expected here (packing splits it), not worth the "longer than max" warning.
    return list(tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"])


def _eos(tokenizer: Any) -> list[int]:
    """[eos], so the model learns where a sample stops; [] for a tokenizer without one."""
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def _tokenize_messages(record: Record, tokenizer: Any, where: str) -> TokenizedSample:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f'{where}: the model\'s tokenizer has no chat template, so "messages" data can\'t be used with it',
            hint=TEMPLATE_HINT,
        )
    messages = [dict(m) for m in record.messages]
    full = _render(tokenizer, messages, where)
    labels = [IGNORE_INDEX] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # The turn's tokens are what rendering it adds after the generation prompt that precedes it. That is only
        # true when each shorter render is a prefix of the longer one; templates that rewrite earlier turns
        # (or date-stamp the system prompt) break it, and then no mask can be trusted.
        before = _render(tokenizer, messages[:i], where, add_generation_prompt=True)
        through = full if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1], where)
        if through[: len(before)] != before or full[: len(through)] != through:
            raise UserError(
                f"{where}: the model's chat template can't be used for \"messages\" data: rendering the "
                f"conversation up to assistant turn messages[{i}] does not give a prefix of the full rendering, "
                "so the assistant tokens can't be found (this is about the model, not this line)",
                hint=TEMPLATE_HINT,
            )
        labels[len(before) : len(through)] = through[len(before) :]
    return TokenizedSample(full, labels, record)


def _render(tokenizer: Any, messages: list[dict], where: str, *, add_generation_prompt: bool = False) -> list[int]:
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    # A chat template is the model's own code: jinja's TemplateError from its raise_exception, but also whatever
    # its expressions raise (TypeError, KeyError...). Any of them means this conversation can't be rendered.
    except Exception as err:  # noqa: BLE001
        message = " ".join(str(err).split()) or type(err).__name__
        raise UserError(
            f"{where}: the model's chat template rejected this conversation: {message}",
            hint="fix the conversation (many templates want user/assistant turns to alternate), or use "
            '"text" or "prompt"/"completion" lines',
        ) from None
    # transformers 5 returns a BatchEncoding (a Mapping) by default; 4.x returns the list of ids.
    if isinstance(rendered, Mapping):
        rendered = rendered["input_ids"]
    return [int(token) for token in rendered]
